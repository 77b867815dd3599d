"""The transformer MLP, ``fc2(gelu(fc1(x)))``, keeping one hidden activation for backward instead of two.

Plain autograd keeps both the ``fc1`` output (for the GELU backward) and the GELU output (for
``fc2``'s weight gradient): two ``(tokens, 4 * dim)`` tensors per MLP, the largest activations of
a ViT block. :class:`Mlp` keeps only the ``fc1`` output and recomputes the GELU (an elementwise op,
no matmul) in backward, which gives the same values: the same kernels run on the same tensors.
For ViT-B at the MultiMAE setting that is 9.7 MB per encoder block in fp32
(``benchmarks/results/vs_official.md``).

Parameter names (``fc1``, ``fc2``) follow timm's ``Mlp``, so checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _LinearGeluLinear(torch.autograd.Function):
    """y = linear(gelu(linear(x, w1, b1)), w2, b2), saving x and the pre-activation only.

    Under autocast the operands are cast as autocast's ``linear`` would cast them (to the
    autocast dtype); the weight gradients are returned in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, w1c, w2c = x.to(dt), w1.to(dt), w2.to(dt)
            h = F.linear(xc, w1c, None if b1 is None else b1.to(dt))
            y = F.linear(F.gelu(h), w2c, None if b2 is None else b2.to(dt))
        ctx.save_for_backward(xc, h, w1c, w2c)
        ctx.meta = (x.dtype, w1.dtype, None if b1 is None else b1.dtype, w2.dtype, None if b2 is None else b2.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        xc, h, w1c, w2c = ctx.saved_tensors
        x_dt, w1_dt, b1_dt, w2_dt, b2_dt = ctx.meta
        gy = gy.to(h.dtype)
        a = F.gelu(h)  # recomputed, not stored
        gy2 = _flat(gy)
        gw2 = gy2.t().mm(_flat(a))
        gb2 = gy2.sum(0) if b2_dt is not None else None
        del a
        gh = torch.ops.aten.gelu_backward(gy.matmul(w2c), h)
        gh2 = _flat(gh)
        gw1 = gh2.t().mm(_flat(xc))
        gb1 = gh2.sum(0) if b1_dt is not None else None
        gx = gh.matmul(w1c) if ctx.needs_input_grad[0] else None
        return (None if gx is None else gx.to(x_dt), gw1.to(w1_dt), None if gb1 is None else gb1.to(b1_dt),
                gw2.to(w2_dt), None if gb2 is None else gb2.to(b2_dt))


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU. x: (..., dim) -> (..., out_features or dim)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
                x.requires_grad or self.fc1.weight.requires_grad or self.fc2.weight.requires_grad):
            return _LinearGeluLinear.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(self.fc1(x)))
