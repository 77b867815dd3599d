"""The one device and precision policy of the apps (predict, pseudolabel, the demo, evaluate).

* :func:`resolve_device`: ``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given.
* :func:`native_bf16`: the one probe of whether a device computes bf16 natively (a CUDA device
  with bf16 support; a CPU with AVX512-BF16 or AMX). Elsewhere bf16 is emulated, slower than fp32.
* :func:`resolve_precision`: ``auto`` -> ``bf16`` on a CUDA device with native bf16, else
  ``fp32``. On the CPU ``auto`` stays fp32 even where bf16 is native: bf16 changes the numbers
  (class ids at boundaries, depth in the third digit), so a CPU run's outputs do not depend on
  which CPU it ran on; ``bf16`` asks for it (a warning where it would be emulated).
* :func:`autocast`: the autocast context of a precision (``fp32``: none; ``bf16``; ``fp16`` on CUDA).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (CUDA with bf16 support; a CPU with
    AVX512-BF16 or AMX tiles)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> ``fp32`` or ``bf16`` for ``device`` (see the module doc).
    Anything else: ValueError naming the value."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "auto":
        return "bf16" if dev.type == "cuda" and native_bf16(dev) else "fp32"
    if precision == "bf16" and not native_bf16(dev):
        warnings.warn(f"precision bf16 on {dev}: bf16 is emulated there, slower than fp32", stacklevel=2)
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast context for ``fp32`` (none), ``bf16`` (CPU or GPU) or ``fp16`` (GPU only)."""
    dev = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    if precision == "fp16":
        if dev != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 on the CPU)")
        return torch.autocast(dev, dtype=torch.float16)
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
