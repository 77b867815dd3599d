"""The memory-saving MLP (GELU recomputed in backward) gives plain autograd's values and gradients,
in fp32 and under bf16 autocast, and keeps timm's parameter names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimae.model.layers.mlp import Mlp


def _reference(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    return m.fc2(F.gelu(m.fc1(x)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_values_and_grads_match_plain_autograd(precision: str) -> None:
    torch.manual_seed(0)
    m = Mlp(24, 96)
    x0 = torch.randn(3, 7, 24)
    results = []
    for fn in (m, lambda x: _reference(m, x)):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = fn(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), x.grad, [p.grad.clone() for p in m.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert y1.dtype == y2.dtype and gx1.dtype == gx2.dtype == torch.float32
    # fp32: the same kernels on the same tensors (the bias sums may add in another order)
    tol = dict(rtol=1e-6, atol=1e-6) if precision == "fp32" else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)
    for a, b, p in zip(gp1, gp2, m.parameters()):
        assert a.dtype == p.dtype and a.stride() == p.stride()
        torch.testing.assert_close(a, b, **tol)


def test_keeps_one_hidden_activation() -> None:
    m = Mlp(16, 64)
    x = torch.randn(5, 16, requires_grad=True)

    def hidden_saved(fn) -> int:  # tensors of shape (5, 64) kept for backward
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            fn(x).sum().backward()
        return saved.count((5, 64))

    assert hidden_saved(lambda t: _reference(m, t)) == 2  # fc1 output and GELU output
    assert hidden_saved(m) == 1  # fc1 output only
    assert list(dict(m.named_parameters())) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_no_grad_path_matches() -> None:
    m = Mlp(8, 32)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference(m, x))
