"""Optimizer param groups (no-decay rules, layer-wise lr decay) and the warm-up+cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimae.engine.optim import (
    WarmupCosine,
    build_optimizer,
    cosine_schedule,
    param_groups,
    scaled_lr,
    vit_layer_id,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)


class ToyViT(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(12, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, 4, d))
        self.global_tokens = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)
        self.frozen = nn.Parameter(torch.zeros(d, d), requires_grad=False)


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


def test_no_decay_groups() -> None:
    m = ToyViT()
    groups = param_groups(m, 0.05, no_decay_names=("pos_emb", "global_tokens"))
    assert len(groups) == 2
    g = by_name(groups)
    decayed = {n for n, x in g.items() if x["weight_decay"] == 0.05}
    assert decayed == {"patch_embed.weight", "blocks.0.fc.weight", "blocks.1.fc.weight",
                       "blocks.2.fc.weight", "head.weight"}
    assert g["blocks.1.norm.weight"]["weight_decay"] == 0.0
    assert g["head.bias"]["weight_decay"] == 0.0
    assert g["pos_emb"]["weight_decay"] == 0.0 and g["global_tokens"]["weight_decay"] == 0.0
    assert "frozen" not in g
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(x["params"]) for x in groups) == n_trainable
    assert all(x["lr_scale"] == 1.0 for x in groups)


def test_decay_everything_when_disabled() -> None:
    groups = param_groups(ToyViT(), 0.1, no_decay_norm_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


def test_vit_layer_id() -> None:
    assert vit_layer_id("pos_emb", 3) == 0
    assert vit_layer_id("encoder.input_adapters.rgb.proj.weight", 3) == 0
    assert vit_layer_id("blocks.0.fc.weight", 3) == 1
    assert vit_layer_id("encoder.blocks.2.norm.bias", 3) == 3
    assert vit_layer_id("head.weight", 3) == 4


def test_layer_decay_scales() -> None:
    depth, ld = 3, 0.5
    groups = param_groups(ToyViT(depth=depth), 0.05, no_decay_names=("pos_emb",),
                          layer_decay=ld, num_layers=depth)
    g = by_name(groups)
    assert g["patch_embed.weight"]["lr_scale"] == pytest.approx(ld ** 4)
    assert g["pos_emb"]["lr_scale"] == pytest.approx(ld ** 4)
    assert g["blocks.0.fc.weight"]["lr_scale"] == pytest.approx(ld ** 3)
    assert g["blocks.2.fc.bias"]["lr_scale"] == pytest.approx(ld ** 1)
    assert g["head.weight"]["lr_scale"] == pytest.approx(1.0)
    # merged by (decay, scale): 5 layer ids x {decay, no decay}
    keys = [(x["weight_decay"], x["lr_scale"]) for x in groups]
    assert len(keys) == len(set(keys)) == 10
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(ToyViT(), 0.05, layer_decay=0.5)
    with pytest.raises(ValueError, match="layer id 9 of parameter"):
        param_groups(ToyViT(), 0.05, layer_decay=0.5, num_layers=3, layer_id_fn=lambda n: 9)


def test_build_optimizer_and_scheduler_scale() -> None:
    m = ToyViT()
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.05, layer_decay=0.5, num_layers=3)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=0, warmup_start_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    # one step still works and state_dict round-trips with names
    m.head(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    opt2 = build_optimizer(ToyViT(), lr=1e-3, weight_decay=0.05, layer_decay=0.5, num_layers=3)
    opt2.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
        build_optimizer(m, "sgdx", lr=1.0)


def test_cosine_schedule_endpoints() -> None:
    kw = dict(total_steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-5, warmup_start_lr=1e-6)
    assert cosine_schedule(0, **kw) == pytest.approx(1e-6)
    assert cosine_schedule(5, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert cosine_schedule(10, **kw) == pytest.approx(1e-3)
    assert cosine_schedule(55, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert cosine_schedule(100, **kw) == pytest.approx(1e-5)
    assert cosine_schedule(1000, **kw) == pytest.approx(1e-5)
    lrs = [cosine_schedule(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up
    assert cosine_schedule(3, 5, 5, 1.0, warmup_start_lr=0.0) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, 10, 11, 1.0)


def test_scheduler_resume_is_exact() -> None:
    def make() -> tuple[torch.optim.Optimizer, WarmupCosine]:
        opt = build_optimizer(ToyViT(), lr=2e-3, layer_decay=0.75, num_layers=3)
        return opt, WarmupCosine(opt, total_steps=30, warmup_steps=7, min_lr=1e-5)

    opt, sched = make()
    full = []
    for _ in range(30):
        full.append([g["lr"] for g in opt.param_groups])
        sched.step()
    assert full[0][-1] == pytest.approx(1e-6 * opt.param_groups[-1]["lr_scale"])
    assert max(row[0] for row in full) == pytest.approx(2e-3 * opt.param_groups[0]["lr_scale"])

    opt, sched = make()
    for _ in range(12):
        sched.step()
    saved = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    resumed = []
    for _ in range(18):
        resumed.append([g["lr"] for g in opt2.param_groups])
        sched2.step()
    assert resumed == full[12:]
    assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]


def test_scaled_lr() -> None:
    assert scaled_lr(1e-4, 2048) == pytest.approx(8e-4)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert math.isclose(scaled_lr(1e-4, 512, ref=512), 1e-4)


def test_optimizer_implementations_agree_and_auto_is_fused() -> None:
    def run(impl: str) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        opt = build_optimizer(model, lr=1e-2, implementation=impl)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(32, 8, generator=g)).square().mean().backward()
            opt.step()
        return opt, [p.detach().clone() for p in model.parameters()]

    auto, w_auto = run("auto")
    assert all(g["fused"] for g in auto.param_groups)  # CPU float parameters: fused kernels
    for impl in ("fused", "foreach", "loop"):
        _, w = run(impl)
        for a, b in zip(w_auto, w):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer implementation 'apex'"):
        build_optimizer(nn.Linear(2, 2), lr=1e-3, implementation="apex")
