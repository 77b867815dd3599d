"""Distributed helpers: single-process fallbacks and a real 2-process gloo group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from multimae.engine import distributed as D

pytestmark = pytest.mark.multiprocess

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not info.is_distributed and info.is_main
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert D.is_main() and not D.is_dist()
    D.barrier()
    x = torch.tensor([1, 2])
    assert torch.equal(D.all_reduce_mean(x), torch.tensor([1.0, 2.0]))
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    m = nn.Linear(2, 2)
    assert D.wrap_ddp(m, info) is m and D.unwrap(m) is m
    D.cleanup()


def test_rank_seed() -> None:
    seeds = {D.rank_seed(0, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**32 for s in seeds)
    assert D.rank_seed(7, 3) == D.rank_seed(7, 3) != D.rank_seed(8, 3)


def test_missing_master_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed()



def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = D.init_distributed(backend="gloo")
    try:
        mean = D.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
        obj = D.broadcast_object({"seed": 1234, "from": rank} if rank == 0 else None)
        torch.manual_seed(0)
        model = D.wrap_ddp(nn.Linear(3, 1), info)
        model(torch.full((2, 3), float(rank + 1))).sum().backward()
        grad = D.unwrap(model).weight.grad.tolist()  # DDP averaged the gradients
        wrapped = type(model).__name__
        del model  # before the process group goes (D.cleanup)
        D.barrier()
        result = {"rank": info.rank, "world": info.world_size, "main": D.is_main(),
                  "mean": mean.tolist(), "obj": obj, "wrapped": wrapped,
                  "grad": grad}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        D.cleanup()


def test_two_process_gloo(tmp_path: Path, free_port) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["main"] == (r == 0)
        assert res["mean"] == [0.5, 5.0]
        assert res["obj"] == {"seed": 1234, "from": 0}
        assert res["wrapped"] == "DistributedDataParallel"
        assert res["grad"] == [[3.0, 3.0, 3.0]]  # mean of 2*1 and 2*2 summed over the batch
