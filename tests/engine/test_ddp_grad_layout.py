"""Under DDP every gradient has the exact layout of its bucket view: no "Grad strides do not
match bucket view strides" warning (which means a copy per parameter per step). The depth patch
projection ([D, 1, p, p]) used to get a gradient whose size-1 channel dimension had another stride.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.multiprocessing as mp

from multimae.core.masking import dirichlet_plan
from multimae.model.multimae import ModelConfig, MultiMAE

CFG = dict(preset="nano", depth=1, image_size=32, patch_size=8, modalities={"semseg": {"num_classes": 5}})



def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    warnings.simplefilter("error")  # any warning (the stride one included) fails the step
    torch.set_num_threads(1)
    from multimae.engine import distributed as D
    from multimae.engine.optim import build_optimizer
    from multimae.engine.step import train_step

    info = D.init_distributed("gloo")
    try:
        torch.manual_seed(0)
        model = MultiMAE(ModelConfig(**CFG))
        net = D.wrap_ddp(model, info)
        opt = build_optimizer(model, lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            batch = {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
                     "semseg": torch.randint(0, 5, (2, 8, 8), generator=g)}
            plan = dirichlet_plan({"rgb": 16, "depth": 16, "semseg": 16}, 2, 12, generator=g)
            train_step(net, batch, opt, plan)
        for name, p in model.named_parameters():
            assert p.grad is None or p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
        del net  # before the process group goes (D.cleanup)
    finally:
        D.cleanup()


def test_ddp_step_without_stride_warning(free_port) -> None:
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)


def test_patch_projection_grads_keep_parameter_layout() -> None:
    torch.manual_seed(0)
    model = MultiMAE(ModelConfig(**CFG))
    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
             "semseg": torch.randint(0, 5, (2, 8, 8), generator=g)}
    model(batch, dirichlet_plan({"rgb": 16, "depth": 16, "semseg": 16}, 2, 12, generator=g)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
