"""train.compile=true on the nano preset: the compiled model trains like the eager one and its
checkpoints load into an uncompiled model.

The default run traces with the ``aot_eager`` backend (dynamo + AOT autograd, no code
generation: ~10 s); the inductor variant compiles C++ kernels and takes minutes on 2 cores, so it
is marked slow (``make test-all``).
"""
import json

import pytest
import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.core.config import load_config
from multimae.model.multimae import MultiMAE
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask
from tiny import TINY_OVERRIDES

NANO = TINY_OVERRIDES + [
        "data.num_samples=16", "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "optim.lr=1e-3",
        "optim.warmup_steps=1", "train.batch_size=8", "train.max_steps=2", "train.log_every=1",
        "train.figure_at_end=false", "train.resume=null"]


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check(tmp_path, backend: str, rel: float) -> None:
    cfg = lambda name, *extra: load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",  # noqa: E731
                                           NANO + [f"train.out_dir={tmp_path}", f"train.run_name={name}", *extra])
    compiled = Trainer(PretrainTask(cfg("compiled", "train.compile=true", f"train.compile_backend={backend}")))
    assert compiled.net is not compiled.model and hasattr(compiled.net, "_orig_mod")
    run = compiled.fit()
    eager = Trainer(PretrainTask(cfg("eager"))).fit()
    got, want = _losses(run), _losses(eager)
    assert len(got) == len(want) == 2 and all(torch.isfinite(torch.tensor(got)))
    assert got == pytest.approx(want, rel=rel)
    weights = load_weights(find_latest(run))
    fresh = MultiMAE(compiled.cfg.model)
    assert set(weights) == set(fresh.state_dict())  # no "_orig_mod." prefixes in the checkpoint
    fresh.load_state_dict(weights)
    for k, v in load_weights(find_latest(eager)).items():
        assert torch.allclose(weights[k], v, rtol=rel, atol=1e-6), k


def test_compile_traces_and_trains_like_eager(tmp_path):
    _check(tmp_path, "aot_eager", 1e-5)


@pytest.mark.slow
def test_compile_inductor_trains_like_eager(tmp_path):
    _check(tmp_path, "inductor", 1e-3)
