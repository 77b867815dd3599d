"""Distributed data parallel on CPU (gloo): gradients equal a single process on the same global
batch, and a 2-process ``torchrun`` pretraining run works end to end."""
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from multimae.core.masking import MaskPlan, dirichlet_plan
from multimae.model.multimae import ModelConfig, MultiMAE

pytestmark = pytest.mark.multiprocess

CFG = dict(preset="nano", depth=2, image_size=32, patch_size=8, modalities={"semseg": {"num_classes": 5}})



def global_batch():
    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.randn(4, 3, 32, 32, generator=g), "depth": torch.randn(4, 1, 32, 32, generator=g),
             "semseg": torch.randint(0, 5, (4, 8, 8), generator=g)}
    plan = dirichlet_plan({"rgb": 16, "depth": 16, "semseg": 16}, 4, 12, generator=g)
    return batch, plan


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from multimae.engine import distributed as D

    info = D.init_distributed("gloo")
    torch.manual_seed(0)
    model = MultiMAE(ModelConfig(**CFG))
    net = D.wrap_ddp(model, info)
    batch, plan = global_batch()
    s = slice(2 * rank, 2 * rank + 2)
    loss = net({k: v[s] for k, v in batch.items()}, MaskPlan({k: m[s] for k, m in plan.masks.items()})).loss
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    del net, loss  # the DDP module goes before the process group (D.cleanup)
    D.cleanup()


def test_ddp_gradients_equal_single_process(tmp_path, free_port):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MultiMAE(ModelConfig(**CFG))
    batch, plan = global_batch()
    model(batch, plan).loss.backward()
    ddp = torch.load(out, weights_only=True)
    for n, p in model.named_parameters():
        assert torch.allclose(ddp[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_torchrun_two_processes(tmp_path, free_port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "multimae.cli.main", "pretrain", "--config", "configs/pretrain/synthetic-tiny.yaml", "--no-eval",
           "model.preset=nano", "model.depth=1", "model.image_size=32", "data.image_size=32", "data.num_samples=64",
           "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "train.batch_size=4", "train.max_steps=3",
           "train.figure_at_end=false", f"train.out_dir={tmp_path}", "train.run_name=ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stdout
    assert (tmp_path / "ddp" / "checkpoints").is_dir()
    assert r.stdout.count("run directory:") == 1  # rank 0 only


def _resume_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from multimae.core.config import load_config
    from multimae.engine import distributed as D
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask
    from multimae.tasks.pretrain_config import PretrainConfig

    D.init_distributed("gloo")
    try:
        def run(name, steps):
            cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", [
                "model.preset=nano", "model.depth=2", "model.image_size=32", "model.drop_path=0.3",
                "data.image_size=32", "data.num_samples=32", "data.num_workers=0", "data.cache=false",
                "mask.num_visible=12", "train.batch_size=4", f"train.max_steps={steps}", "train.ckpt_every=2",
                "train.log_every=1", "train.figure_at_end=false", f"train.out_dir={out}", f"train.run_name={name}"])
            Trainer(PretrainTask(cfg)).fit(evaluate=False)

        run("full", 4)
        run("cut", 2)
        run("cut", 4)  # resumes at step 2: every rank continues with its own RNG (drop path differs per rank)
    finally:
        D.cleanup()


def test_ddp_resume_with_drop_path_is_exact(tmp_path, free_port):
    from multimae.checkpoint import find_latest, load_weights

    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = load_weights(find_latest(tmp_path / "full")), load_weights(find_latest(tmp_path / "cut"))
    assert find_latest(tmp_path / "cut").name == find_latest(tmp_path / "full").name
    for k in a:
        assert torch.equal(a[k], b[k]), k
