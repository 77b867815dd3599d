"""Optimizer construction (weight-decay groups, layer-wise lr decay) and warm-up + cosine schedules.

Every param group carries ``lr_scale`` (1.0 without layer decay) and ``weight_decay``; the
schedule sets ``group["lr"] = lr(step) * group["lr_scale"]`` before every optimizer step, and
its state is one integer, so resuming reproduces the learning-rate sequence exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from multimae.model.layers.layer_decay import EMBED_PATTERNS, vit_layer_id  # noqa: F401 (re-exported)

__all__ = [
    "param_groups",
    "vit_layer_id",
    "build_optimizer",
    "cosine_schedule",
    "WarmupCosine",
    "scaled_lr",
]

def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_norm_bias: bool = True,
    no_decay_names: Iterable[str] = (),
    layer_decay: float | None = None,
    layer_id_fn: Callable[[str], int] | None = None,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into optimizer groups by (weight decay, lr scale).

    Args:
        model: the module (unwrapped, or DDP-wrapped: names then start with ``module.``).
        weight_decay: decay for ordinary weights (matrices, conv kernels).
        no_decay_norm_bias: give 1-D parameters (norm weights, biases) and scalars no decay.
        no_decay_names: substrings; a parameter whose name contains one gets no decay
            (e.g. ``"global_tokens"``, ``"mask_token"``, ``"pos_emb"``).
        layer_decay: if set, a parameter at layer ``i`` gets
            ``lr_scale = layer_decay ** (num_layers + 1 - i)``.
        layer_id_fn: name -> layer index in ``[0, num_layers + 1]``; defaults to
            :func:`vit_layer_id`.
        num_layers: number of transformer blocks; required with ``layer_decay``.
    Returns:
        Groups ``{"params", "param_names", "weight_decay", "lr_scale"}`` in order of first
        appearance; only parameters with ``requires_grad``.
    """
    patterns = tuple(no_decay_names)
    if layer_decay is not None:
        if num_layers is None:
            raise ValueError("param_groups: layer_decay needs num_layers")
        if layer_id_fn is None:
            n = num_layers
            layer_id_fn = lambda name: vit_layer_id(name, n)  # noqa: E731
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (no_decay_norm_bias and p.ndim <= 1) or any(s in name for s in patterns)
        wd = 0.0 if no_decay else float(weight_decay)
        scale = 1.0
        if layer_decay is not None:
            assert layer_id_fn is not None and num_layers is not None
            lid = layer_id_fn(name)
            if not 0 <= lid <= num_layers + 1:
                raise ValueError(
                    f"param_groups: layer id {lid} of parameter '{name}' is outside "
                    f"[0, {num_layers + 1}]"
                )
            scale = float(layer_decay) ** (num_layers + 1 - lid)
        g = groups.setdefault(
            (wd, scale), {"params": [], "param_names": [], "weight_decay": wd, "lr_scale": scale}
        )
        g["params"].append(p)
        g["param_names"].append(name)
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameters")
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    eps: float = 1e-8,
    implementation: str = "auto",
    **group_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer over :func:`param_groups` of ``model``.

    ``lr`` is the base (peak) learning rate; each group starts at ``lr * lr_scale``.
    ``group_kwargs`` go to :func:`param_groups` (``no_decay_names``, ``layer_decay``, ...).
    Only ``"adamw"`` (``torch.optim.AdamW``) is supported. ``implementation``: ``"fused"`` (one
    multi-threaded kernel per parameter; for ViT-B on a 2-core Xeon 0.063 s per step against
    0.29 s for the per-tensor loop and 0.28 s for foreach), ``"foreach"``, ``"loop"``, or ``"auto"``
    (fused where every parameter is a floating-point tensor on the CPU or a CUDA device, else
    torch's default).
    """
    groups = param_groups(model, weight_decay, **group_kwargs)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if name.lower() != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; supported: 'adamw'")
    kwargs = _implementation_kwargs(implementation, [p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "loop")


def _implementation_kwargs(implementation: str, params: list[torch.Tensor]) -> dict[str, bool]:
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation {implementation!r}: expected one of {OPTIMIZER_IMPLEMENTATIONS}")
    if implementation == "auto":
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return {"fused": True} if fusable else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[implementation]


def cosine_schedule(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    min_lr: float = 0.0,
    warmup_start_lr: float = 1e-6,
) -> float:
    """Learning rate at ``step``: linear warm-up, then half-cosine decay.

    ``step = 0`` -> ``warmup_start_lr``; ``step = warmup_steps`` -> ``base_lr``;
    ``step >= total_steps`` -> ``min_lr``.
    """
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"cosine_schedule: need total_steps > 0 and 0 <= warmup_steps <= total_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return base_lr if step < total_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Per-optimizer-step warm-up + cosine schedule that honours each group's ``lr_scale``.

    Usage: ``optimizer.step(); scheduler.step()``. Construction sets the lr of step 0; after
    ``k`` calls to :meth:`step` the groups hold the lr for optimizer step ``k``.
    ``state_dict`` holds the step counter and hyper-parameters; ``load_state_dict`` restores
    them (like torch schedulers) and re-applies the lr, so resumption is exact.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        warmup_start_lr: float = 1e-6,
        base_lr: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.warmup_start_lr = float(warmup_start_lr)
        self.base_lr = float(optimizer.defaults["lr"] if base_lr is None else base_lr)
        self.last_step = 0
        self._apply()  # validates the schedule (cosine_schedule)

    def lr_at(self, step: int) -> float:
        """Unscaled learning rate for optimizer step ``step``."""
        return cosine_schedule(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr,
                               self.warmup_start_lr)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance one optimizer step and set the groups' lr for the next one."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of every param group (scaled)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Step counter and hyper-parameters (plain numbers: safe for weights-only loading)."""
        return {k: getattr(self, k) for k in _SCHEDULE_STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and set the groups' lr for the restored step."""
        for k in _SCHEDULE_STATE:  # an older state may lack the hyper-parameters: kept as built
            if k in state or k == "last_step":
                setattr(self, k, type(getattr(self, k))(state[k]))  # int steps, float rates
        self._apply()


_SCHEDULE_STATE = ("last_step", "total_steps", "warmup_steps", "min_lr", "warmup_start_lr", "base_lr")


def scaled_lr(base_lr: float, global_batch: int, ref: int = 256) -> float:
    """Linear scaling rule: ``base_lr * global_batch / ref`` (MAE / MultiMAE convention)."""
    return base_lr * global_batch / ref
