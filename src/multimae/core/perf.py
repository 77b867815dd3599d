"""Process-level performance settings for CPU training.

:func:`tune_malloc` keeps freed memory in glibc's heap instead of returning it to the kernel.
PyTorch on the CPU allocates through ``malloc``; with glibc's defaults, tensors of more than a
few MB are ``mmap``-ed and unmapped on free, so every training step pays page faults (and page
zeroing) for its activations, casts and gradients again: tens of thousands of faults per ViT-B
step, measured at 4% of an fp32 step and 20% of a bf16-autocast step on a 2-core Xeon
(``benchmarks/pretrain_throughput.py`` with and without ``--no-tune-malloc``). It is what ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` do, applied from inside the process; a
variable the user set wins. The cost is that the process keeps its peak heap size.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = (  # (parameter, value, environment variable that overrides it)
    (_M_MMAP_THRESHOLD, 32 << 20, "MALLOC_MMAP_THRESHOLD_"),  # glibc's maximum on 64-bit
    (_M_TRIM_THRESHOLD, (1 << 31) - 1, "MALLOC_TRIM_THRESHOLD_"),
    (_M_TOP_PAD, 256 << 20, "MALLOC_TOP_PAD_"),
)


def _glibc(name: str) -> "ctypes._CFuncPtr | None":
    """A glibc function by name, or None off Linux/glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def tune_malloc() -> bool:
    """Apply the allocator settings once per process; True if glibc accepted them.

    A no-op returning False off Linux/glibc (macOS, musl) and on a failed ``mallopt``.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value, env in _SETTINGS if env not in os.environ])


def trim_malloc() -> bool:
    """Return glibc's free heap memory to the kernel (``malloc_trim(0)``); True if it released
    any. For a server after a large, rare allocation (the demo after decoding an upload); a
    no-op returning False off Linux/glibc."""
    fn = _glibc("malloc_trim")
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(fn(0))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark reports; ``unknown`` when unreadable."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
