"""What every benchmark script shares, in one place: the machine (CPU name and flags, native bf16,
load average, free memory), timing, FLOP counts, peak memory, the GPU peak-TFLOP/s table (MFU)
and atomic result files.

Scripts import it as a sibling module (``benchmarks/`` is the script's directory, so it is on
``sys.path`` when a script runs; tests that load a script by path put it there too). Heavy
imports (torch) happen inside the functions, so a script's argument parsing stays cheap.
"""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- machine
def _cpuinfo(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU's model name (the library's :func:`multimae.core.perf.cpu_model`, else ``lscpu``), never empty."""
    from multimae.core.perf import cpu_model

    name = cpu_model()
    if name in ("", "unknown"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        except (OSError, subprocess.SubprocessError):
            name = ""
    return name or "unknown CPU"


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16, AMX): the library's one probe."""
    from multimae.core.device import native_bf16 as probe

    return probe("cpu")


def load_average() -> tuple[float, float, float]:
    """1-, 5- and 15-minute load averages (zeros where the OS has none)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (0.0, 0.0, 0.0)


def machine_line(device: Any = None) -> str:
    """One line naming the CPU (and GPU), its SIMD flags, native bf16 and the load average."""
    import torch

    flags = cpu_flags()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]
    line = (f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, flags {' '.join(simd) or 'none of avx2/avx512/amx'} "
            f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: "
            f"{'yes' if native_bf16() else 'no'}); load average {load_average()[0]}")
    if device is not None and torch.device(device).type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}"
    return line


def machine_info() -> dict[str, Any]:
    """Python, platform, torch, CPU name, cores and load average as a dict (for JSON results)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    info.update(cpu=cpu_name(), cores=os.cpu_count(), load_average=list(load_average()))
    return info


def mem_available_gib() -> float:
    """``MemAvailable`` of /proc/meminfo in GiB (NaN where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- memory
def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``); None where there is none."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set of this process in MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address
    space. ``getrusage``'s ``ru_maxrss`` is not used there: Linux carries it across ``exec``, so a
    child started by a parent that already holds a large model reports the parent's peak.
    Elsewhere ``ru_maxrss`` (macOS: bytes)."""
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    rss = proc_status_kb("VmRSS")
    return float("nan") if rss is None else rss / 1024


def reset_gpu_peak(device: Any) -> None:
    """Collect garbage and, on a GPU, empty the cache and reset the peak-allocation counter."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_gb(device: Any) -> float | None:
    """Peak GPU memory allocated by torch since the last :func:`reset_gpu_peak` (GiB); None off a GPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


# ----------------------------------------------------------------------------- time
def sync(device: Any) -> None:
    """Wait for the device (a no-op on the CPU)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = None, cpu: list[float] | None = None) -> float:
    """Wall seconds of one call of ``fn``, the device synchronised before and after; appends the
    process's CPU seconds (all threads) of the call to ``cpu`` when given."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- FLOPs
def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None,  # type: ignore[no-untyped-def]
                             **kwargs) -> int:
    # model FLOPs: twice the forward, as the explicit softmax(q k^T) v form counts; torch's own
    # formula for the CUDA kernels adds the recomputation of q k^T, which would make fused rows
    # count more work than manual ones for the same model
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * sdpa_flop_count(q_shape, k_shape, v_shape)


def flop_counter() -> Any:
    """A ``FlopCounterMode`` (no display) that also counts the CPU flash-attention kernels
    (forward and backward), which torch's own table leaves out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten, mapping = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs (matmul, conv, attention; forward and backward) of one call of ``fn``."""
    with flop_counter() as fc:
        fn()
    return float(fc.get_total_flops())


def matmul_gflops(device: Any, dtype: Any, sizes: tuple[int, ...], repeats: int = 3) -> float:
    """Best measured GFLOP/s of a square ``a @ b`` in ``dtype`` on ``device`` over ``sizes``."""
    import torch

    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(repeats):
            best = max(best, 2 * n**3 / timed(lambda: a @ b, device) / 1e9)
    return best


# ----------------------------------------------------------------------------- GPU peaks
# Nominal dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (which print
# the 2:4-sparsity figure: halved here); the first match of the device name wins, so the specific
# parts come before the generic ones. H100 / H200 data sheet: SXM 1,979 -> 989; NVL 1,671 -> 835;
# H100 PCIe (first data sheet) 1,513 -> 756. "NVIDIA H100 80GB HBM3" is the SXM part.
PEAK_BF16_TFLOPS: list[tuple[str, float | None, str]] = [
    (r"H100.*PCIe", 756.0, "H100 PCIe"),
    (r"H100 NVL", 835.0, "H100 NVL"),
    (r"H200 NVL", 835.0, "H200 NVL"),
    (r"H100|H200|GH200", 989.0, "H100 / H200 SXM"),
    (r"A100", 312.0, "A100"),
    (r"L40S", 362.0, "L40S"),
    (r"\bL4\b", 121.0, "L4"),
    (r"A10\b", 125.0, "A10"),
    (r"A10G", 70.0, "A10G (AWS; NVIDIA publishes no datasheet, commonly cited figure)"),
    (r"RTX 4090", 165.0, "RTX 4090 (fp32 accumulate)"),
    (r"RTX 3090", 71.0, "RTX 3090 (fp32 accumulate)"),
    (r"V100", None, "V100 (no bf16 tensor cores: bf16 is emulated; fp16 peak 125)"),
]
H100_SXM_TFLOPS = 989.0  # the reference part of the project's GPU goal


def nominal_peak(name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s or None, which entry) for a device name; (None, "unknown") off the table."""
    for pattern, tflops, label in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops, label
    return None, "unknown"


# ----------------------------------------------------------------------------- results
def _save_file_atomic() -> Callable[[Path, Callable[[Path], None]], Path]:
    from multimae.core.io import save_file_atomic  # the library's one atomic writer (fsync, the user's umask)

    return save_file_atomic


def write_atomic(path: str | os.PathLike[str], write_fn: Callable[[Path], None]) -> Path:
    """``write_fn(tmp)`` then the file appears at ``path`` whole or not at all (the library's
    atomic writer: fsync, the user's umask); parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save_file_atomic()(path, write_fn)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (``default=str``), written atomically: a result file exists only complete."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")
