"""Counting the calls that make the host wait for the device.

On a GPU every read of a device value -- ``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()``,
``t.tolist()``, ``nonzero`` and boolean-mask indexing (whose output size the host must learn) --
stalls the host until the device has caught up, and each one is a graph break for
``torch.compile``. :class:`HostSyncCounter` counts them on any device, the CPU included, so a CPU
test can prove a training step has none (``tests/engine/test_host_sync.py``) and
``benchmarks/gpu_check.py`` can report them per step; :func:`graph_breaks` says where
``torch.compile`` would split a function.

Not counted: calls made by ``torch.optim`` itself (its step counters are CPU tensors on every
device, so reading them never waits for the device).
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter", "SYNC_CALLS", "graph_breaks"]

#: Tensor methods and torch functions whose result is a Python value read off the tensor, or a
#: tensor whose size depends on its values.
SYNC_CALLS = frozenset({
    "__bool__", "__int__", "__float__", "__index__", "__complex__", "item", "tolist", "numpy", "__array__",
    "is_nonzero", "equal", "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "repeat_interleave",
})
_TORCH_OPTIM = ("torch/optim/", "torch\\optim\\")


def _bool_index(index: Any) -> bool:
    """Whether a ``__getitem__`` / ``__setitem__`` index holds a boolean mask tensor."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _from_optim() -> bool:
    """Whether the call comes from inside ``torch.optim`` (its step counters live on the CPU)."""
    frame = sys._getframe(1)
    while frame is not None:
        if any(p in frame.f_code.co_filename for p in _TORCH_OPTIM):
            return True
        frame = frame.f_back
    return False


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...`` -> ``c.total`` calls that read device values,
    ``c.calls`` by name (``getitem[bool]`` for boolean-mask indexing). ``repeat_interleave`` counts
    only without ``output_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "") or str(func)
        hit = None
        if name in SYNC_CALLS and not (name == "repeat_interleave" and "output_size" in kwargs):
            hit = name
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_index(args[1]):
            hit = f"{name.strip('_')}[bool]"
        if hit is not None and not _from_optim():
            self.calls[hit] += 1
        return func(*args, **kwargs)


def graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What ``torch.compile`` would make of ``fn(*args, **kwargs)``, by ``torch._dynamo.explain``
    (traces, runs nothing compiled): ``{"graphs", "graph_breaks", "reasons"}`` (the first five reasons,
    one line each)."""
    import torch._dynamo

    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [re.sub(r"\s+", " ", str(getattr(r, "reason", r)))[:200] for r in ex.break_reasons[:5]]
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "reasons": reasons}
