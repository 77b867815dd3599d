"""Head-to-head with the official MultiMAE code: one pretraining step, same process, same torch.

Setting (the official pretraining config): rgb, depth, semseg (133 classes) in; rgb, depth,
semseg and norm_rgb out; 224 px; batch 8; 98 visible tokens (Dirichlet alpha 1); AdamW. The
official step runs in fp32 as its script does on a CPU; this project's step runs in fp32 and in
bf16 autocast. The official code is imported at run time from a checkout (``--official PATH``,
default ``../shared/official-multimae``); nothing of it lives in this repository.

    python benchmarks/vs_official.py                          # base + small -> benchmarks/results/vs_official.md
    python benchmarks/vs_official.py --presets small --steps 7 --profile
    python benchmarks/vs_official.py --official /path/to/MultiMAE --out /tmp/vs.md

Fine-tuning (``--finetune``): one step of each official fine-tuning setting -- semseg from rgb and
from rgb+depth (ConvNeXt adapter), depth (DPT adapter), classification (linear adapter) -- every
token, no masking, fp32, official MultiViT against this project's transfer model + task loss, at
the official configs' image sizes and batches unless ``--ft-size`` / ``--ft-batch`` say otherwise.
The pretraining results already in ``--out``'s .json are kept; ``--ft-render`` merges runs.

    python benchmarks/vs_official.py --finetune all --ft-size semseg-rgb=256,semseg-rgbd=256 --ft-batch 2 \
        --threads 1 --steps 5 --warmup 1 --child-steps 2 --profile

Timing: every variant warms up, then the timed steps go round-robin (official, ours fp32, ours
bf16, official, ...), so drift and other jobs on a shared machine slow all variants alike; the
median of ``--steps`` (>= 7 by default) is reported. Peak memory: each variant runs a few steps
alone in a child process of its own (``--child``) and reports its peak resident set size
(``VmHWM``, see ``max_rss_mb``) -- or, on a GPU, ``torch.cuda.max_memory_allocated``.

On a CUDA device the same command times the GPU: bf16 autocast, flash SDPA, fused AdamW and
``torch.compile`` for this project's step (``--compile auto``), CUDA-synchronised timing, and
model FLOP utilisation against the device's measured bf16 matmul peak (and its nominal peak when
the device is a known one). On a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 matmuls are
emulated and tens of times slower than fp32, so the bf16 rows are skipped there unless
``--bf16-emulated`` is given.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OFFICIAL = ROOT.parent / "shared" / "official-multimae"
RESULTS = ROOT / "benchmarks" / "results" / "vs_official.md"
OFFICIAL_CONFIG = "cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml"
SEMSEG_CLASSES = 133
VISIBLE = 98
TARGETS = {"fp32": 1.15, "bf16": 2.0, "memory": 0.8}
# Nominal dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU on known GPUs.
NOMINAL_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                       "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.0}

Step = Callable[[dict[str, torch.Tensor]], dict[str, float]]


# ----------------------------------------------------------------------------- machine
def _cpuinfo(key: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def native_bf16() -> bool:
    """Whether oneDNN computes bf16 matmuls natively on this CPU (AVX512-BF16, AMX or AVX2-VNNI-2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine_line(device: torch.device) -> str:
    flags = cpu_flags()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]
    line = (f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, flags {' '.join(simd) or 'none of avx2/avx512/amx'} "
            f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: "
            f"{'yes' if native_bf16() else 'no'})")
    if device.type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}"
    return line


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def max_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own address
    space. ``getrusage``'s ``ru_maxrss`` is not used there: Linux carries it across ``exec``, so a
    memory child started by a parent that already holds a ViT-B step reports the parent's peak
    (every variant came out at the same 5707 MB that way). Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    return float("nan") if rss is None else rss


# ----------------------------------------------------------------------------- official code
def load_official(path: Path) -> dict[str, Any]:
    """Import the official pretraining script and model from a checkout; its ``multimae`` package is
    renamed out of the way (this project's package has the same name). Returns its modules."""
    path = path.resolve()
    script = path / "run_pretraining_multimae.py"
    if not script.is_file() or not (path / "multimae" / "multimae.py").is_file():
        raise SystemExit(f"vs_official: {path} is not a checkout of the official MultiMAE code "
                         f"(no run_pretraining_multimae.py / multimae/multimae.py there); pass --official PATH")
    if "multimae" in sys.modules and not str(getattr(sys.modules["multimae"], "__file__", "")).startswith(str(path)):
        raise RuntimeError("load_official must run before this project's multimae is imported")
    # torch 2 removed torch._six, which the official utils import; its utils/__init__ pulls dataset
    # code (torchvision datasets, wandb) that a training step does not need.
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    sys.modules["torch._six"] = six
    utils = types.ModuleType("utils")
    utils.__path__ = [str(path / "utils")]
    sys.modules["utils"] = utils
    sys.path.insert(0, str(path))
    try:
        for name in ("registry", "model_builder", "native_scaler", "optim_factory", "task_balancing",
                     "data_constants", "dist"):
            importlib.import_module(f"utils.{name}")
        mods = {n: sys.modules[f"utils.{n}"] for n in ("registry", "model_builder", "native_scaler", "dist")}
        utils.create_model = mods["model_builder"].create_model
        utils.register_model = mods["registry"].register_model
        utils.NativeScalerWithGradNormCount = mods["native_scaler"].NativeScalerWithGradNormCount
        utils.get_grad_norm_ = mods["native_scaler"].get_grad_norm_
        utils.get_world_size = mods["dist"].get_world_size
        utils.get_rank = mods["dist"].get_rank
        datasets = types.ModuleType("utils.datasets")
        datasets.build_multimae_pretraining_dataset = None
        sys.modules["utils.datasets"] = datasets
        utils.datasets = datasets
        script_mod = importlib.import_module("run_pretraining_multimae")
        model_mod = importlib.import_module("multimae.multimae")
        # the fine-tuning adapters (ConvNeXt, DPT, linear) and the input adapters they pair with
        in_mod = importlib.import_module("multimae.input_adapters")
        out_mod = importlib.import_module("multimae.output_adapters")
    except ImportError as e:
        raise SystemExit(f"vs_official: importing the official code from {path} failed: {e} "
                         f"(it needs einops and pyyaml)") from e
    finally:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != path]
    for k in [k for k in sys.modules if k == "multimae" or k.startswith("multimae.")]:
        sys.modules["official_" + k] = sys.modules.pop(k)
    return {"script": script_mod, "model": model_mod, "utils": utils, "path": path, "input_adapters": in_mod,
            "output_adapters": out_mod, "optim_factory": sys.modules["utils.optim_factory"]}


def official_step(off: dict[str, Any], preset: str, batch: int, device: torch.device) -> Step:
    """The official pretraining step (forward, losses, backward, AdamW) at its config, fp32."""
    rp, path = off["script"], off["path"]
    from functools import partial

    from einops import rearrange
    from torch import nn

    name = f"pretrain_multimae_{preset}"
    registry = sys.modules["utils.registry"]
    if name not in registry._model_entrypoints:  # the official code registers base and large only
        dims = {"small": (384, 6), "tiny": (192, 3)}[preset]

        def build(input_adapters: Any, output_adapters: Any, **kw: Any) -> nn.Module:
            return off["model"].MultiMAE(input_adapters=input_adapters, output_adapters=output_adapters,
                                         dim_tokens=dims[0], depth=12, num_heads=dims[1], mlp_ratio=4, qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
        build.__name__ = name
        registry.register_model(build)
    argv = sys.argv
    sys.argv = ["official", "--config", str(path / OFFICIAL_CONFIG), "--device", device.type, "--batch_size", str(batch)]
    try:
        a = rp.get_args()
    finally:
        sys.argv = argv
    a.model = name
    a.in_domains, a.out_domains = a.in_domains.split("-"), a.out_domains.split("-")
    a.all_domains = sorted(set(a.in_domains) | set(a.out_domains))
    a.lr = a.blr * a.batch_size / 256
    torch.manual_seed(0)
    model = rp.get_model(a).to(device)
    balancer = rp.NoWeightingStrategy()
    conf = rp.DOMAIN_CONF
    losses = {d: conf[d]["loss"](patch_size=a.patch_size, stride=conf[d]["stride_level"]) for d in a.out_domains}
    losses["norm_rgb"] = conf["rgb"]["loss"](patch_size=a.patch_size, stride=conf["rgb"]["stride_level"], norm_pix=True)
    with contextlib.redirect_stdout(io.StringIO()):
        opt = rp.create_optimizer(a, {"model": model, "balancer": balancer})
    scaler = rp.NativeScaler()
    fp32_out = a.fp32_output_adapters.split("-")

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        t = dict(x)
        # the official script standardises depth per sample on its 10-90% quantile range
        flat = torch.sort(rearrange(t["depth"], "b c h w -> b (c h w)"), dim=1)[0]
        flat = flat[:, int(0.1 * flat.shape[1]): int(0.9 * flat.shape[1])]
        t["depth"] = (t["depth"] - flat.mean(1)[:, None, None, None]) / torch.sqrt(flat.var(1)[:, None, None, None] + 1e-6)
        preds, masks = model({k: v for k, v in t.items() if k in a.in_domains}, num_encoded_tokens=a.num_encoded_tokens,
                             alphas=a.alphas, sample_tasks_uniformly=a.sample_tasks_uniformly,
                             fp32_output_adapters=fp32_out)
        t["norm_rgb"], masks["norm_rgb"] = t["rgb"], masks.get("rgb")
        task = {k: losses[k](preds[k].float(), t[k], mask=masks.get(k)) for k in preds}
        loss = sum(balancer(task).values())
        opt.zero_grad()
        scaler(loss, opt, clip_grad=a.clip_grad, skip_grad=a.skip_grad, parameters=model.parameters(),
               create_graph=False)
        return {"loss": float(loss), **{f"loss/{k}": float(v) for k, v in task.items()}}
    return step


# ----------------------------------------------------------------------------- this project
def our_model(preset: str, device: torch.device) -> Any:
    from multimae import ModelConfig, MultiMAE

    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, inputs=["rgb", "depth", "semseg"], outputs=["rgb", "depth", "semseg", "norm_rgb"],
                      modalities={"semseg": {"num_classes": SEMSEG_CLASSES}})
    return MultiMAE(cfg).to(device)


def our_step(preset: str, precision: str, batch: int, device: torch.device, compile_model: bool,
             plan_seed: int = 3) -> Step:
    """This project's step exactly as ``multimae pretrain`` runs it (``train_step``, fused AdamW,
    allocator tuning, ``train.attention=auto``), with a fresh seeded Dirichlet plan every step."""
    from multimae import dirichlet_plan
    from multimae.data.transforms import robust_standardize
    from multimae.core.perf import tune_malloc
    from multimae.engine.optim import build_optimizer
    from multimae.engine.step import train_step

    tune_malloc()
    model = our_model(preset, device)
    opt = build_optimizer(model, lr=1e-4 * batch / 256)
    run = torch.compile(model) if compile_model else model
    counts = model.token_counts(224)
    g = torch.Generator().manual_seed(plan_seed)

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        b = dict(x)
        b["depth"] = torch.stack([robust_standardize(d) for d in b["depth"]])
        plan = dirichlet_plan(counts, batch_size=batch, num_visible=VISIBLE, alpha=1.0, generator=g)
        return train_step(run, b, opt, plan, precision=precision)
    step.model = model  # type: ignore[attr-defined]
    return step


def make_batch(batch: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"rgb": torch.randn(batch, 3, 224, 224, generator=g), "depth": torch.rand(batch, 1, 224, 224, generator=g),
         "semseg": torch.randint(0, SEMSEG_CLASSES, (batch, 56, 56), generator=g)}
    return {k: v.to(device) for k, v in x.items()}


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, x: dict[str, torch.Tensor], device: torch.device, cpu: list[float] | None = None) -> float:
    """Wall seconds of one step; appends the process's CPU seconds (all threads) to ``cpu``."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    step(x)
    _sync(device)
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return time.perf_counter() - t


def build_variants(names: list[str], off: dict[str, Any] | None, preset: str, a: argparse.Namespace,
                   device: torch.device) -> dict[str, Step]:
    out: dict[str, Step] = {}
    for n in names:
        if n == "official":
            assert off is not None
            out[n] = official_step(off, preset, a.batch, device)
        else:
            out[n] = our_step(preset, n, a.batch, device, a.compile_model)
    return out


def interleaved(steps: dict[str, Step], x: dict[str, torch.Tensor], a: argparse.Namespace, device: torch.device,
                log: Callable[[str], None],
                on_round: Callable[[dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    for n, s in steps.items():
        for i in range(a.warmup):
            log(f"  warm-up {n} {i + 1}/{a.warmup}: {timed(s, x, device):.2f} s")
    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for i in range(a.steps):
        for n, s in steps.items():
            times[n].append(timed(s, x, device, cpu[n]))
        log(f"  round {i + 1}/{a.steps}: " + ", ".join(f"{n} {t[-1]:.2f} s (CPU {cpu[n][-1]:.2f} s)"
                                                         for n, t in times.items()))
        if on_round is not None:
            on_round(times, cpu)
    return times, cpu


def profile_ops(step: Step, x: dict[str, torch.Tensor], device: torch.device, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """One step under torch.profiler: (total self CPU seconds, top ops as (name, self CPU s, calls))."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(x)
        _sync(device)
    ev = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    ev.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return total, [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ev[:top]]


def model_flops(step: Step, x: dict[str, torch.Tensor]) -> float:
    """FLOPs of one of this project's steps (forward + backward matmuls/attention), FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(x)
    return float(fc.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured GFLOP/s of a square matmul in ``dtype`` on ``device``."""
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def first_losses(preset: str, batch: int, device: torch.device, n: int, precisions: list[str]) -> dict[str, list[dict[str, float]]]:
    """Per-task losses of this project's first ``n`` steps from the same init, batch and plans, per precision."""
    x = make_batch(batch, device, seed=5)
    out = {}
    for p in precisions:
        s = our_step(preset, p, batch, device, compile_model=False, plan_seed=11)
        out[p] = [{k: v for k, v in s(x).items() if k.startswith("loss")} for _ in range(n)]
        del s
    return out


def child_main(a: argparse.Namespace) -> int:
    """``--child VARIANT``: run one variant alone and print its peak memory as JSON."""
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    off = load_official(Path(a.official)) if a.child == "official" else None
    base = current_rss_mb()
    if a.finetune:
        step = build_ft_variants([a.child], off, a.finetune, a.preset, a, device)[a.child]
        x = make_ft_batch(FT_TASKS[a.finetune], *ft_setting(a.finetune, a), device)
    else:
        step = build_variants([a.child], off, a.preset, a, device)[a.child]
        x = make_batch(a.batch, device)
    built = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.child_steps):
        step(x)
    res = {"variant": a.child, "preset": a.preset, "task": a.finetune, "peak_rss_mb": max_rss_mb(), "rss_after_import_mb": base,
           "rss_after_build_mb": built}
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("VS_OFFICIAL_CHILD " + json.dumps(res))
    return 0


def peak_memory(variant: str, preset: str, a: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--presets", preset,
           "--official", str(a.official), "--batch", str(a.batch), "--threads", str(a.threads),
           "--device", a.device, "--child-steps", str(a.child_steps)] + (["--compile"] if a.compile_model else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith("VS_OFFICIAL_CHILD "):
            return json.loads(line.split(" ", 1)[1])
    print(f"memory child {variant}/{preset} failed (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
    return None


# ----------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FtTask:
    """One fine-tuning setting: the official config's values (facts read off EPFL-VILAB/MultiMAE
    ``cfgs/finetune/...``, which the shared checkout does not hold) and this project's config of it."""

    label: str
    config: str  # this project's configs/finetune/<config>.yaml
    official_config: str
    inputs: tuple[str, ...]
    kind: str  # segmentation | depth | classification
    size: int  # official input_size
    batch: int  # official per-GPU batch_size
    num_classes: int
    drop_path: float
    lr: float | None  # absolute peak lr (None: blr * batch / 256)
    blr: float | None
    weight_decay: float
    layer_decay: float


FT_TASKS: dict[str, FtTask] = {
    "semseg-rgb": FtTask("semseg from rgb (ConvNeXt head)", "nyuv2-semseg-rgb",
                         "cfgs/finetune/semseg/nyu/ft_nyu_200e_multimae-b_rgb.yaml", ("rgb",), "segmentation",
                         640, 2, 40, 0.1, 1e-4, None, 0.05, 0.75),
    "semseg-rgbd": FtTask("semseg from rgb+depth (ConvNeXt head)", "nyuv2-semseg-rgbd",
                          "cfgs/finetune/semseg/nyu/ft_nyu_200e_multimae-b_rgb-depth.yaml", ("rgb", "depth"),
                          "segmentation", 640, 2, 40, 0.1, 1e-4, None, 0.05, 0.75),
    "depth": FtTask("depth from rgb (DPT head)", "nyuv2-depth", "cfgs/finetune/depth/ft_nyu_2000e_multimae-b.yaml",
                    ("rgb",), "depth", 256, 64, 1, 0.0, 1e-4, None, 1e-4, 0.75),
    "cls": FtTask("classification from rgb (linear head, mean pooling)", "in1k-cls",
                  "cfgs/finetune/cls/ft_in1k_100e_multimae-b.yaml", ("rgb",), "classification", 224, 128, 1000, 0.1,
                  None, 5e-4, 0.05, 0.65),
}
FT_TARGETS = {"speed": 1.2, "memory": 0.8}
SEG_IGNORE = 255  # the official SEG_IGNORE_INDEX and this project's data.ignore_index
PRESET_DIMS = {"base": (768, 12), "small": (384, 6), "tiny": (192, 3)}


def parse_per_task(spec: str, what: str) -> dict[str, int]:
    """``"256"`` (every task) or ``"semseg-rgb=640,depth=256"`` -> {task: value}; "" -> {}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, val = part.rpartition("=")
        names = [key] if key else list(FT_TASKS)
        bad = [n for n in names if n not in FT_TASKS]
        if bad or not val.isdigit() or int(val) < 1:
            raise SystemExit(f"vs_official: {what} {part!r}: expected N or TASK=N with TASK in {sorted(FT_TASKS)}")
        out.update({n: int(val) for n in names})
    return out


def ft_setting(name: str, a: argparse.Namespace) -> tuple[int, int]:
    """(image size, batch) of a fine-tuning task: the official ones unless --ft-size / --ft-batch say."""
    t = FT_TASKS[name]
    return parse_per_task(a.ft_size, "--ft-size").get(name, t.size), parse_per_task(a.ft_batch, "--ft-batch").get(name, t.batch)


def make_ft_batch(task: FtTask, size: int, batch: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs (rgb; depth already standardised, as both data pipelines hand it over) and the task's
    target under this project's batch keys: ``target`` (+ ``target_valid`` for depth)."""
    g = torch.Generator().manual_seed(seed)
    x = {"rgb": torch.randn(batch, 3, size, size, generator=g)}
    if "depth" in task.inputs:
        x["depth"] = torch.randn(batch, 1, size, size, generator=g)
    if task.kind == "segmentation":
        t = torch.randint(0, task.num_classes, (batch, size, size), generator=g)
        t[torch.rand(batch, size, size, generator=g) < 0.05] = SEG_IGNORE  # some unlabelled pixels
        x["target"] = t
    elif task.kind == "depth":
        x["target"] = torch.rand(batch, 1, size, size, generator=g) + 0.5
        x["target_valid"] = torch.rand(batch, 1, size, size, generator=g) > 0.1
    else:
        x["target"] = torch.randint(0, task.num_classes, (batch,), generator=g)
    return {k: v.to(device) for k, v in x.items()}


def _masked_berhu(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """berHu (reverse Huber, Laina et al. 2016) over the valid pixels, threshold 0.2 x the largest
    absolute error: the official depth fine-tuning loss, written from its formula (the official
    script is not in the shared checkout)."""
    d = (pred - target)[valid.expand_as(pred)]
    ad = d.abs()
    c = (0.2 * ad.max().detach()).clamp_min(1e-5)
    return torch.where(ad <= c, ad, (d * d + c * c) / (2 * c)).mean()


def official_ft_step(off: dict[str, Any], name: str, preset: str, size: int, batch: int,
                     device: torch.device) -> Step:
    """The official fine-tuning step at its config: MultiViT (no masking, every token) with the
    official input adapters and the task's official output adapter, layer-decayed AdamW from the
    official optimizer factory, forward, loss, backward and step through the official
    NativeScaler (grad norm measured, no clipping), fp32."""
    from functools import partial

    from timm.loss import LabelSmoothingCrossEntropy
    from torch import nn

    task = FT_TASKS[name]
    ia, oa, of = off["input_adapters"], off["output_adapters"], off["optim_factory"]
    model_name = f"multivit_{preset}"
    registry = sys.modules["utils.registry"]
    dim, heads = PRESET_DIMS[preset]
    if model_name not in registry._model_entrypoints:  # the official code registers base and large only

        def build(input_adapters: Any, output_adapters: Any, **kw: Any) -> nn.Module:
            return off["model"].MultiViT(input_adapters=input_adapters, output_adapters=output_adapters,
                                         dim_tokens=dim, depth=12, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
        build.__name__ = model_name
        registry.register_model(build)
    channels = {"rgb": 3, "depth": 1}
    inputs = {d: ia.PatchedInputAdapter(num_channels=channels[d], stride_level=1, patch_size_full=16, image_size=size,
                                        learnable_pos_emb=False) for d in task.inputs}
    if task.kind == "segmentation":  # decoder_dim 6144 (ViT-B configs), preds_per_patch 16, depth 4, main task rgb
        key = "semseg"
        head = oa.ConvNeXtAdapter(num_classes=task.num_classes, embed_dim=6144 if preset == "base" else 8 * dim,
                                  patch_size=16, preds_per_patch=16, depth=4, interpolate_mode="bilinear",
                                  main_tasks=["rgb"])
        crit = nn.CrossEntropyLoss(ignore_index=SEG_IGNORE)
        loss_fn = lambda p, x: crit(p, x["target"])  # noqa: E731
    elif task.kind == "depth":  # hooks [2, 5, 8, 11], layer dims [96, 192, 384, 768] for ViT-B, feature_dim 256
        key = "depth"
        head = oa.DPTOutputAdapter(num_classes=1, stride_level=1, patch_size=16, main_tasks=["rgb"],
                                   layer_dims=[dim // 8, dim // 4, dim // 2, dim], head_type="regression")
        loss_fn = lambda p, x: _masked_berhu(p, x["target"], x["target_valid"])  # noqa: E731
    else:  # mean pooling, label smoothing 0.1 (mixup / cutmix off on both sides)
        key = "cls"
        head = oa.LinearOutputAdapter(num_classes=task.num_classes, use_mean_pooling=True)
        crit = LabelSmoothingCrossEntropy(smoothing=0.1)
        loss_fn = lambda p, x: crit(p, x["target"])  # noqa: E731
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = off["utils"].create_model(model_name, input_adapters=inputs, output_adapters={key: head},
                                          drop_path_rate=task.drop_path).to(device)
        nl = model.get_num_layers()
        assigner = of.LayerDecayValueAssigner([task.layer_decay ** (nl + 1 - i) for i in range(nl + 2)])
        lr = task.lr if task.lr is not None else task.blr * batch / 256
        args = types.SimpleNamespace(opt="adamw", lr=lr, weight_decay=task.weight_decay, opt_eps=1e-8,
                                     opt_betas=[0.9, 0.999], momentum=0.9, decoder_decay=None, no_lr_scale_list="")
        opt = of.create_optimizer(args, model, skip_list=model.no_weight_decay(), get_num_layer=assigner.get_layer_id,
                                  get_layer_scale=assigner.get_scale)
    for g in opt.param_groups:  # what the official loop sets before every step
        g["lr"] = lr * g["lr_scale"]
    scaler = off["utils"].NativeScalerWithGradNormCount(enabled=False)  # fp32: no loss scaling on a CPU
    all_layers = task.kind == "depth"  # the official scripts' return_all_layers for DPT
    model.train()

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        preds = model({d: x[d] for d in task.inputs}, return_all_layers=all_layers)
        loss = loss_fn(preds[key], x)
        value = loss.item()
        opt.zero_grad()
        scaler(loss, opt, clip_grad=None, parameters=model.parameters(), create_graph=False)
        return {"loss": value}
    step.model = model  # type: ignore[attr-defined]
    return step


def our_ft_step(name: str, preset: str, size: int, batch: int, device: torch.device) -> Step:
    """This project's fine-tuning step as ``multimae finetune`` runs it: the shipped config of the
    task (fp32, mixup / cutmix off), ``build_transfer_model`` from scratch, the task loss of
    ``build_loss``, AdamW with layer-wise lr decay as the fine-tuning trainer builds it,
    ``train.attention`` and allocator tuning, one ``train_step``."""
    from multimae.core.config import load_config
    from multimae.model.layers.attention import set_attention
    from multimae.core.perf import tune_malloc
    from multimae.tasks.finetune import FinetuneObjective, build_loss
    from multimae.tasks.finetune_config import FinetuneConfig, target_of
    from multimae.engine.optim import build_optimizer, scaled_lr
    from multimae.engine.step import train_step
    from multimae.model.transfer import build_transfer_model

    task = FT_TASKS[name]
    over = [f"model.encoder.preset={preset}", f"model.encoder.image_size={size}", f"data.image_size={size}",
            f"train.batch_size={batch}", "train.precision=fp32", "aug.mixup=0", "aug.cutmix=0"]
    if preset != "base" and task.kind == "segmentation":
        over.append("model.head.embed_dim=null")  # 8 x dim, the ViT-B 6144 scaled
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / f"{task.config}.yaml", over)
    if cfg.train.tune_malloc:
        tune_malloc()
    torch.manual_seed(0)
    model, _ = build_transfer_model(cfg.model, "scratch")
    set_attention(model, cfg.train.attention)
    model.to(device)
    o = cfg.optim
    lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, batch)
    decay = dict(layer_decay=o.layer_decay, layer_id_fn=model.encoder_layer_ids(),
                 num_layers=model.num_layers) if o.layer_decay is not None else {}
    opt = build_optimizer(model, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                          implementation=o.implementation, no_decay_norm_bias=True,
                          no_decay_names=sorted(model.no_weight_decay()), **decay)
    objective = FinetuneObjective(model, build_loss(cfg), target_of(cfg), None)

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        return train_step(objective, x, opt, None, precision="fp32", clip_grad=o.clip_grad)
    step.model = model  # type: ignore[attr-defined]
    return step


def build_ft_variants(names: list[str], off: dict[str, Any] | None, task: str, preset: str, a: argparse.Namespace,
                      device: torch.device) -> dict[str, Step]:
    size, batch = ft_setting(task, a)
    out: dict[str, Step] = {}
    for n in names:
        if n == "official":
            assert off is not None
            out[n] = official_ft_step(off, task, preset, size, batch, device)
        else:
            out[n] = our_ft_step(task, preset, size, batch, device)
    return out


def ft_peak_memory(variant: str, task: str, a: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--finetune", task,
           "--presets", a.preset, "--official", str(a.official), "--threads", str(a.threads), "--device", a.device,
           "--child-steps", str(a.child_steps), "--ft-size", a.ft_size, "--ft-batch", a.ft_batch]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith("VS_OFFICIAL_CHILD "):
            return json.loads(line.split(" ", 1)[1])
    print(f"memory child {variant}/{task} failed (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
    return None


def ft_tasks(a: argparse.Namespace) -> list[str]:
    names = list(FT_TASKS) if a.finetune == "all" else [t.strip() for t in a.finetune.split(",") if t.strip()]
    bad = [t for t in names if t not in FT_TASKS]
    if bad or not names:
        raise SystemExit(f"vs_official: --finetune {a.finetune!r}: tasks are {', '.join(FT_TASKS)} (or all)")
    return names


def run_finetune(a: argparse.Namespace, off: dict[str, Any] | None, device: torch.device,
                 log: Callable[[str], None], write_partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The fine-tuning section: per task, both steps warm up, then alternate round-robin in this
    process; then each variant's peak memory alone in a child process."""
    names = [n for n in a.variants.split(",") if n in ("official", "ours")]
    ft: dict[str, Any] = {"argv": sys.argv[1:], "preset": a.preset,
                          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "machine": machine_line(device), "device": device.type, "tasks": {}, "notes": list(a.ft_note),
                          "settings": {k: getattr(a, k) for k in ("threads", "warmup", "steps", "child_steps")}}
    load0 = os.getloadavg()
    for name in ft_tasks(a):
        task = FT_TASKS[name]
        size, batch = ft_setting(name, a)
        log(f"== fine-tuning {name}: {task.label}, {preset_label(a.preset)}, {size} px, batch {batch}")
        steps = build_ft_variants(names, off, name, a.preset, a, device)
        x = make_ft_batch(task, size, batch, device)
        base = {"label": task.label, "size": size, "batch": batch, "official_size": task.size, "run": ft["date"],
                "load_at_start": os.getloadavg()[0],
                "official_batch": task.batch, "official_config": task.official_config, "config": task.config,
                "params": {n: sum(p.numel() for p in s.model.parameters()) for n, s in steps.items()}}

        def partial(times: dict[str, list[float]], cpu: dict[str, list[float]], name: str = name,
                    base: dict[str, Any] = base) -> None:
            ft["tasks"][name] = dict(base, times=times, cpu=cpu, partial=True,
                                     median={n: statistics.median(t) for n, t in times.items()},
                                     cpu_median={n: statistics.median(t) for n, t in cpu.items()})
            write_partial(ft)

        times, cpu = interleaved(steps, x, a, device, log, on_round=partial)
        r = dict(base, times=times, cpu=cpu, median={n: statistics.median(t) for n, t in times.items()},
                 cpu_median={n: statistics.median(t) for n, t in cpu.items()})
        if a.profile:
            r["profile"] = {n: profile_ops(s, x, device, a.top) for n, s in steps.items()}
        del steps, x
        if not a.no_memory:
            r["memory"] = {n: ft_peak_memory(n, name, a) for n in names}
        ft["tasks"][name] = r
        write_partial(ft)
        log(f"  medians: " + ", ".join(f"{n} {m:.2f} s (CPU {r['cpu_median'][n]:.2f} s)" for n, m in r["median"].items()))
    load1 = os.getloadavg()
    ft["load_note"] = (f"Load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs.")
    ft["verdicts"] = ft_verdicts(ft)
    return ft


def ft_verdicts(ft: dict[str, Any]) -> list[str]:
    out = []
    for name, r in ft["tasks"].items():
        med, cpu, mem = r["median"], r.get("cpu_median") or {}, r.get("memory") or {}
        parts = []
        if "official" in med and "ours" in med:
            w, c = med["official"] / med["ours"], cpu["official"] / cpu["ours"]
            s = FT_TARGETS["speed"]
            parts.append(f"CPU seconds {c:.2f}x (target >= {s:.1f}x: {'met' if c >= s else 'NOT met'}); "
                         f"wall {w:.2f}x ({'met' if w >= s else 'NOT met'})")
        o, m = (mem.get("official") or {}).get("peak_rss_mb"), (mem.get("ours") or {}).get("peak_rss_mb")
        if o and m:
            parts.append(f"memory {m / o:.2f}x (target <= {FT_TARGETS['memory']:.1f}x: "
                         f"{'met' if m / o <= FT_TARGETS['memory'] else 'NOT met'})")
        else:
            parts.append("memory not measured")
        out.append(f"- {name} ({r['size']} px, batch {r['batch']}): " + "; ".join(parts))
    return out


def ft_markdown(ft: dict[str, Any]) -> list[str]:
    s = argparse.Namespace(**ft["settings"])
    lines = ["# Fine-tuning: this project vs the official MultiMAE fine-tuning code", "",
             f"Produced by `python benchmarks/vs_official.py {' '.join(ft['argv'])}` on {ft['date']}.", "",
             f"Machine: {ft['machine']}; torch {torch.__version__}, {s.threads} threads, device `{ft['device']}`. "
             + ft.get("load_note", ""), "",
             f"Setting: {preset_label(ft['preset'])}, patch 16, one fine-tuning step = forward over every token "
             "(no masking), task loss, backward, AdamW step with layer-wise lr decay, fp32. Official side: "
             "`MultiViT` from the shared checkout with its `PatchedInputAdapter`s and the task's official output "
             "adapter, its optimizer factory and `NativeScalerWithGradNormCount` (which measures the gradient "
             "norm; ours does too), the loss of the official script (cross-entropy ignoring 255; berHu on valid "
             "pixels; label-smoothed cross-entropy). Ours: the shipped `configs/finetune/*.yaml` of the task, "
             "`multimae.model.transfer.build_transfer_model`, the loss of `multimae.tasks.finetune.build_loss`, "
             "`train_step`. Mixup / cutmix off on both sides; inputs are synthetic tensors, depth input already "
             "standardised (both code bases standardise in the data pipeline / before the model). Every variant "
             f"warms up ({s.warmup} steps), then official and ours alternate round-robin in one process; medians "
             f"of {s.steps} steps. Peak memory: each variant alone in a child process ({s.child_steps} steps), "
             "`VmHWM` of the whole process.", "",
             "| task | official config | size, batch (official) | official CPU s | ours CPU s | speed-up CPU s | "
             "official wall s | ours wall s | speed-up wall |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in ft["tasks"].items():
        cm, med = r.get("cpu_median") or {}, r["median"]
        f = lambda d, n: f"{d[n]:.2f}" if n in d else "—"  # noqa: E731
        lines.append(f"| {name}: {r['label']} | `{r['official_config'].split('/')[-1]}` | {r['size']} px x {r['batch']} "
                     f"({r['official_size']} px x {r['official_batch']}) | {f(cm, 'official')} | {f(cm, 'ours')} | "
                     f"{_ratio(cm.get('official'), cm.get('ours'))} | {f(med, 'official')} | {f(med, 'ours')} | "
                     f"{_ratio(med.get('official'), med.get('ours'))} |")
    lines += ["", "All timed steps, CPU s / wall s: " + "; ".join(
        f"{name} {n}: " + ", ".join(f"{c:.2f}/{t:.2f}" for c, t in zip(r["cpu"][n], r["times"][n]))
        for name, r in ft["tasks"].items() for n in r["times"]), ""]
    if any(r.get("memory") for r in ft["tasks"].values()):
        lines += ["## Fine-tuning peak memory", "", "| task | variant | parameters | peak RSS (MB) | RSS after import (MB) | "
                  "RSS after build (MB) | vs official | step (MB) | step vs official |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in ft["tasks"].items():
            mem = r.get("memory") or {}
            o = mem.get("official") or {}
            off_peak = o.get("peak_rss_mb")
            off_step = off_peak - o["rss_after_build_mb"] if off_peak else None
            for n, m in mem.items():
                if m is None:
                    lines.append(f"| {name} | {n} | — | failed | | | | | |")
                    continue
                st = m["peak_rss_mb"] - m["rss_after_build_mb"]
                lines.append(f"| {name} | {n} | {r['params'].get(n, 0) / 1e6:.1f}M | {m['peak_rss_mb']:.0f} | "
                             f"{m['rss_after_import_mb']:.0f} | {m['rss_after_build_mb']:.0f} | "
                             f"{_ratio(m['peak_rss_mb'], off_peak)} | {st:.0f} | {_ratio(st, off_step)} |")
        lines.append("")
    lines += ["## Fine-tuning targets (ours >= 1.2x faster, <= 0.8x memory)", ""] + ft.get("verdicts", []) + [""]
    for name, r in ft["tasks"].items():
        for n, (total, ops) in (r.get("profile") or {}).items():
            lines += [f"## Profile: fine-tuning {name} {n}, one step, top ops by self CPU time", "",
                      f"Sum of all ops' self CPU time: {total:.2f} s (torch.profiler; overhead inflates it).", "",
                      "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{k}` | {sec:.3f} | {100 * sec / total:.1f}% | {c} |" for k, sec, c in ops]
            lines.append("")
    if ft.get("notes"):
        lines += ["## Fine-tuning notes", ""]
        for n in ft["notes"]:
            lines += [n, ""]
    return lines


# ----------------------------------------------------------------------------- report
def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def preset_label(p: str) -> str:
    return {"base": "ViT-B", "small": "ViT-S", "tiny": "ViT-Ti"}.get(p, p)


def markdown(res: dict[str, Any]) -> str:
    if not res.get("presets"):  # a fine-tuning run without pretraining results to keep
        return "\n".join(ft_markdown(res["finetune"]))
    dev = res["device"]
    a = argparse.Namespace(**res["settings"])
    lines = [
        "# This project vs the official MultiMAE code",
        "",
        f"Produced by `python benchmarks/vs_official.py {' '.join(res['argv'])}` on {res['date']}.",
        "",
        f"Machine: {res['machine']}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{a.threads} threads, device `{dev}`. Official code: `{res['official']}`.",
        "",
        "Setting: the official pretraining config (rgb, depth, semseg with 133 classes in; rgb, depth, semseg, "
        f"norm_rgb out), 224 px, batch {a.batch}, {VISIBLE} visible tokens (Dirichlet alpha 1), AdamW; one step = "
        "depth standardisation, forward, losses, backward, optimizer step. The official step runs in fp32 as its "
        "script does on a CPU. Every variant warms up "
        f"({a.warmup} steps), then the variants' timed steps alternate round-robin in one process; medians of "
        f"{a.steps} steps. Peak memory: each variant alone in its own process ({a.child_steps} steps), peak resident "
        "set size of the whole process (`VmHWM` of /proc/self/status), which includes torch itself"
        + ("; on a GPU, `torch.cuda.max_memory_allocated`" if dev == "cuda" else "") + ".",
        "",
    ]
    if res.get("load_note"):
        lines += [res["load_note"], ""]
    hdr = "| preset | official fp32 | ours fp32 | ours bf16 | speed-up fp32 | speed-up bf16 |"
    lines += ["## Speed", "", hdr, "|---|---:|---:|---:|---:|---:|"]
    for p, r in res["presets"].items():
        med = r["median"]
        cell = lambda n: f"{med[n]:.2f} s/step ({a.batch / med[n]:.2f} img/s)" if n in med else r["skipped"].get(n, "—")  # noqa: E731
        lines.append(f"| {preset_label(p)} | {cell('official')} | {cell('fp32')} | {cell('bf16')} | "
                     f"{_ratio(med.get('official'), med.get('fp32'))} | {_ratio(med.get('official'), med.get('bf16'))} |")
    if any(r.get("cpu_median") for r in res["presets"].values()):
        lines += ["", "CPU seconds per step (the process's user + system time over all its threads, "
                  "`time.process_time`; what a step costs when other jobs take the wall clock, "
                  "though OpenMP spin-waiting counts too):", "",
                  "| preset | official fp32 | ours fp32 | ours bf16 | ratio fp32 | ratio bf16 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p, r in res["presets"].items():
            cm = r.get("cpu_median") or {}
            c = lambda n: f"{cm[n]:.2f} CPU s" if n in cm else "—"  # noqa: E731
            lines.append(f"| {preset_label(p)} | {c('official')} | {c('fp32')} | {c('bf16')} | "
                         f"{_ratio(cm.get('official'), cm.get('fp32'))} | {_ratio(cm.get('official'), cm.get('bf16'))} |")
    lines += ["", "All timed steps (s): " + "; ".join(
        f"{preset_label(p)} {n}: {', '.join(f'{t:.2f}' for t in ts)}" for p, r in res["presets"].items()
        for n, ts in r["times"].items()), ""]
    if any(r.get("memory") for r in res["presets"].values()):
        lines += ["## Peak memory", "", "Peak RSS: the whole process (the target's measure). Step: peak RSS minus the RSS "
                  "once the model and optimizer are built (activations, gradients, optimizer state, allocator), "
                  "which leaves out what importing the two code bases costs.", "",
                  "| preset | variant | peak RSS (MB) | RSS after import (MB) | RSS after build (MB) | vs official | "
                  "step (MB) | step vs official |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for p, r in res["presets"].items():
            mem = r.get("memory") or {}
            o = mem.get("official") or {}
            off = o.get("peak_rss_mb")
            off_step = off - o["rss_after_build_mb"] if off else None
            for n, m in mem.items():
                if m is None:
                    continue
                st = m["peak_rss_mb"] - m["rss_after_build_mb"]
                lines.append(f"| {preset_label(p)} | {n} | {m['peak_rss_mb']:.0f} | {m['rss_after_import_mb']:.0f} | "
                             f"{m['rss_after_build_mb']:.0f} | {_ratio(m['peak_rss_mb'], off)} | {st:.0f} | "
                             f"{_ratio(st, off_step)} |")
        lines.append("")
    if dev == "cuda":
        lines += ["## GPU utilisation", ""]
        for p, r in res["presets"].items():
            for n, u in r.get("mfu", {}).items():
                lines.append(f"- {preset_label(p)} {n}: {u}")
        lines.append("")
    if res.get("losses"):
        lines += ["## First-step losses, fp32 vs bf16 (this project, same init, batch and masks)", ""]
        lines += res["losses"] + [""]
    lines += ["## Targets", ""] + res["verdicts"] + [""]
    for p, r in res["presets"].items():
        for n, (total, ops) in r.get("profile", {}).items():
            lines += [f"## Profile: {preset_label(p)} {n}, one step, top ops by self CPU time", "",
                      f"Sum of all ops' self CPU time: {total:.2f} s (torch.profiler; overhead inflates it).", "",
                      "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{k}` | {s:.3f} | {100 * s / total:.1f}% | {c} |" for k, s, c in ops]
            lines.append("")
    if res.get("notes"):
        lines += ["## Notes", ""] + res["notes"] + [""]
    if res.get("finetune"):
        lines += ft_markdown(res["finetune"])
    return "\n".join(lines)


def verdicts(res: dict[str, Any]) -> list[str]:
    out = []
    for p, r in res["presets"].items():
        med, mem = r["median"], r.get("memory") or {}
        parts = []
        cpu = r.get("cpu_median") or {}
        for n in ("fp32", "bf16"):
            if "official" in med and n in med:
                x = med["official"] / med[n]
                c = (f"; CPU seconds {cpu['official'] / cpu[n]:.2f}x: "
                     f"{'met' if cpu['official'] / cpu[n] >= TARGETS[n] else 'NOT met'}") if cpu.get(n) and cpu.get("official") else ""
                parts.append(f"{n} wall {x:.2f}x (target >= {TARGETS[n]:.2f}x: {'met' if x >= TARGETS[n] else 'NOT met'}{c})")
            else:
                parts.append(f"{n}: not measured ({r['skipped'].get(n, 'not requested')})")
        off = (mem.get("official") or {}).get("peak_rss_mb")
        for n in ("fp32", "bf16"):
            m = (mem.get(n) or {}).get("peak_rss_mb")
            if off and m:
                x = m / off
                parts.append(f"memory {n} {x:.2f}x (target <= {TARGETS['memory']:.2f}x: "
                             f"{'met' if x <= TARGETS['memory'] else 'NOT met'})")
        out.append(f"- {preset_label(p)}: " + "; ".join(parts))
    return out


def write_json(res: dict[str, Any], path: Path) -> None:
    """All results (medians, times, memory, profiles, ...): read by data_throughput.py and ``--render``."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def render(paths: list[Path], a: argparse.Namespace) -> int:
    """Merge the JSON results of separate runs (e.g. one process per preset) into one markdown file."""
    runs = [json.loads(p.read_text()) for p in paths]
    res = dict(runs[0])
    res["presets"] = {k: v for r in runs for k, v in r["presets"].items()}
    res["notes"] = [n for r in runs for n in r.get("notes", [])]
    res["losses"] = next((r["losses"] for r in runs if r.get("losses")), None)
    res["argv"] = [" ; ".join(" ".join(r["argv"]) for r in runs)]
    res["date"] = " / ".join(dict.fromkeys(r["date"] for r in runs))
    res["load_note"] = " ".join(dict.fromkeys(r["load_note"] for r in runs if r.get("load_note")))
    if any(r["settings"] != runs[0]["settings"] for r in runs):
        res["notes"].append("The merged runs used different settings: " + "; ".join(str(r["settings"]) for r in runs))
    res["verdicts"] = verdicts(res)
    ft = next((r["finetune"] for r in runs if r.get("finetune")), None)
    if ft is not None:
        res["finetune"] = ft
    for r in res["presets"].values():  # JSON turned the profile tuples into lists
        r["profile"] = {n: (t, [tuple(o) for o in ops]) for n, (t, ops) in r.get("profile", {}).items()}
    text = markdown(res)
    a.out.write_text(text + "\n")
    write_json(res, a.out.with_suffix(".json"))
    print(text)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL,
                    help="checkout of the official MultiMAE code (default ../shared/official-multimae)")
    ap.add_argument("--presets", default="base,small", help="comma-separated: base, small (tiny for smoke tests)")
    ap.add_argument("--variants", default="official,fp32,bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    ap.add_argument("--compile", dest="compile_mode", default="auto", choices=["auto", "on", "off"],
                    help="torch.compile this project's model (auto: on a GPU only)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    ap.add_argument("--child-steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table per variant (top ops)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--loss-steps", type=int, default=3, help="first steps whose fp32/bf16 losses are compared (0: skip)")
    ap.add_argument("--bf16-emulated", action="store_true",
                    help="time bf16 even where the CPU has no native bf16 (very slow)")
    ap.add_argument("--note", action="append", default=[], help="free text added under Notes (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, nargs="+", default=None,
                    help="only merge the .json results of earlier runs into --out (one run per preset, say)")
    ap.add_argument("--finetune", default=None, metavar="TASKS",
                    help=f"time fine-tuning steps instead of pretraining: comma-separated {', '.join(FT_TASKS)} or all; "
                         "the pretraining results already in --out's .json are kept")
    ap.add_argument("--ft-size", default="", help="fine-tuning image size: N (every task) or TASK=N,... "
                                                   "(default: the official config's)")
    ap.add_argument("--ft-batch", default="", help="fine-tuning batch: N or TASK=N,... (default: the official config's)")
    ap.add_argument("--ft-note", action="append", default=[], help="free text under Fine-tuning notes (repeatable)")
    ap.add_argument("--ft-render", type=Path, nargs="+", default=None,
                    help="only merge the fine-tuning sections of these .json results (tasks of later files win) "
                         "into --out, keeping the pretraining results of --out's .json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.compile_model = a.compile_mode == "on" or (a.compile_mode == "auto" and a.device == "cuda")
    a.preset = a.presets.split(",")[0]
    if a.finetune:
        parse_per_task(a.ft_size, "--ft-size"), parse_per_task(a.ft_batch, "--ft-batch")  # fail early
        ours = [{"fp32": "ours"}.get(n, n) for n in a.variants.split(",") if n in ("official", "ours", "fp32")]
        a.variants = ",".join(dict.fromkeys(ours))
        if a.child is None:
            ft_tasks(a)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(a)
    if a.render:
        return render(a.render, a)
    if a.ft_render:
        return ft_render(a.ft_render, a)
    if not (a.official / "run_pretraining_multimae.py").is_file():
        print(f"vs_official: no official MultiMAE checkout at {a.official} (run_pretraining_multimae.py missing); "
              "pass --official PATH", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    off = load_official(a.official) if "official" in names else None

    def log(msg: str) -> None:
        print(msg, flush=True)

    if a.finetune:
        return finetune_main(a, off, device, log)
    res: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "device": device.type,
                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": machine_line(device), "official": str(a.official.resolve()),
                           "presets": {}, "notes": list(a.note),
                           "settings": {k: getattr(a, k) for k in ("threads", "batch", "warmup", "steps", "child_steps")}}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16_ok = device.type == "cuda" or native_bf16() or a.bf16_emulated
    load0 = os.getloadavg()
    for p in a.presets.split(","):
        log(f"== {preset_label(p)}")
        run = [n for n in names if n != "bf16" or bf16_ok]
        skipped = {} if bf16_ok or "bf16" not in names else {
            "bf16": "skipped: this CPU has no native bf16 (emulated bf16 matmuls run tens of times slower than fp32)"}
        steps = build_variants(run, off, p, a, device)
        x = make_batch(a.batch, device)

        def partial(times: dict[str, list[float]], cpu: dict[str, list[float]], p: str = p,
                    skipped: dict[str, str] = skipped) -> None:
            """After every round: the results so far, renderable with --render if the run is cut short."""
            res["presets"][p] = {"times": times, "median": {n: statistics.median(t) for n, t in times.items()},
                                 "cpu": cpu, "cpu_median": {n: statistics.median(t) for n, t in cpu.items()},
                                 "skipped": skipped}
            res["verdicts"], res["load_note"] = [], f"(partial: {len(next(iter(times.values())))} rounds)"
            if a.out:
                write_json(res, a.out.with_suffix(".partial.json"))

        times, cpu = interleaved(steps, x, a, device, log, on_round=partial)
        r: dict[str, Any] = {"times": times, "median": {n: statistics.median(t) for n, t in times.items()},
                             "cpu": cpu, "cpu_median": {n: statistics.median(t) for n, t in cpu.items()},
                             "skipped": skipped}
        if a.profile:
            r["profile"] = {n: profile_ops(s, x, device, a.top) for n, s in steps.items()}
        if device.type == "cuda":
            ours = [n for n in run if n != "official"]  # FLOPs counted on an eager copy of the model
            flops = model_flops(our_step(p, ours[-1], a.batch, device, compile_model=False), x) if ours else None
            peak = matmul_peak(device, torch.bfloat16)
            nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
            r["mfu"] = {}
            for n, med in r["median"].items():
                if flops and n != "official":
                    achieved = flops / med / 1e9
                    r["mfu"][n] = (f"{a.batch / med:.1f} img/s, {achieved / 1e3:.1f} TFLOP/s = {100 * achieved / peak:.1f}% "
                                   f"of the measured bf16 matmul peak ({peak / 1e3:.0f} TFLOP/s)"
                                   + (f", {100 * achieved / (nominal * 1e3):.1f}% of the nominal {nominal:.0f}" if nominal else ""))
        del steps
        if not a.no_memory:
            r["memory"] = {n: peak_memory(n, p, a) for n in run}
        res["presets"][p] = r
        log(f"  medians: " + ", ".join(f"{n} {m:.2f} s" for n, m in r["median"].items()))
    if a.loss_steps and bf16_ok and "bf16" in names:
        p = a.presets.split(",")[-1]
        fl = first_losses(p, a.batch, device, a.loss_steps, ["fp32", "bf16"])
        rows = [f"{preset_label(p)}, steps 1-{a.loss_steps}:", "", "| step | task | fp32 | bf16 | rel. diff |", "|---:|---|---:|---:|---:|"]
        worst = 0.0
        for i, (l32, l16) in enumerate(zip(fl["fp32"], fl["bf16"])):
            for k in l32:
                d = abs(l16[k] - l32[k]) / max(abs(l32[k]), 1e-8)
                worst = max(worst, d)
                rows.append(f"| {i + 1} | {k} | {l32[k]:.5f} | {l16[k]:.5f} | {d:.2e} |")
        rows += ["", f"Largest relative difference: {worst:.2e} (bf16 keeps 8 mantissa bits: ~4e-3 per rounding; "
                 f"tolerance used: 2e-2) -> {'within' if worst <= 2e-2 else 'OUTSIDE'} tolerance."]
        res["losses"] = rows
    elif a.loss_steps:
        res["notes"].append("fp32/bf16 first-step losses not compared here (no bf16 run); "
                            "`tests/training/test_bf16_losses.py` compares them on a small model.")
    load1 = os.getloadavg()
    res["load_note"] = (f"Load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs "
                        "(other jobs share the machine: absolute times are noisy, the interleaved ratios less so).")
    res["verdicts"] = verdicts(res)
    text = markdown(res)
    write_results(a.out, res, text, log)
    print(text)
    return 0


def write_results(out: Path | None, res: dict[str, Any], text: str, log: Any) -> None:
    """The markdown report and its JSON, each written atomically (nothing without --out)."""
    if not out:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, out)
    write_json(res, out.with_suffix(".json"))
    log(f"wrote {out} and {out.with_suffix('.json').name}")


def merge_ft(fts: list[dict[str, Any]]) -> dict[str, Any]:
    """One fine-tuning section from several runs: tasks of later runs replace earlier ones; the
    runs' commands, dates and load notes are all listed."""
    owner: dict[str, int] = {}
    for i, ft in enumerate(fts):
        owner.update({t: i for t in ft["tasks"]})
    used = [fts[i] for i in sorted(set(owner.values()))]
    for i, ft in enumerate(fts):  # only the tasks a run contributes
        fts[i] = dict(ft, tasks={t: r for t, r in ft["tasks"].items() if owner[t] == i})
    out = dict(fts[-1])
    out["tasks"] = {}
    for ft in fts:
        out["tasks"].update(ft["tasks"])
    if len(used) > 1:
        out["argv"] = [" ; ".join(" ".join(ft["argv"]) for ft in used)]
        out["date"] = " / ".join(dict.fromkeys(ft["date"] for ft in used))
        out["load_note"] = " ".join(f"Run of {ft['date']} ({', '.join(ft['tasks'])}): {ft.get('load_note', '(partial)')}"
                                    for ft in fts if ft["tasks"])
        out["notes"] = list(dict.fromkeys(n for ft in used for n in ft.get("notes", [])))
        if any(ft["settings"] != used[0]["settings"] for ft in used):
            out["notes"].append("The merged runs used different settings: " + "; ".join(str(ft["settings"]) for ft in used))
    out["verdicts"] = ft_verdicts(out)
    return out


def ft_render(paths: list[Path], a: argparse.Namespace) -> int:
    """``--ft-render A.json B.json``: merge fine-tuning runs into --out (pretraining results kept)."""
    fts = [json.loads(p.read_text())["finetune"] for p in paths]
    prev = a.out.with_suffix(".json")
    res: dict[str, Any] = json.loads(prev.read_text()) if prev.is_file() else {}
    for r in res.get("presets", {}).values():
        r["profile"] = {n: (t, [tuple(o) for o in ops]) for n, (t, ops) in r.get("profile", {}).items()}
    res["finetune"] = merge_ft(fts)
    if a.ft_note:
        res["finetune"]["notes"] = list(res["finetune"].get("notes", [])) + list(a.ft_note)
    text = markdown(res)
    a.out.write_text(text + "\n")
    write_json(res, prev)
    print("\n".join(ft_markdown(res["finetune"])))
    return 0


def finetune_main(a: argparse.Namespace, off: dict[str, Any] | None, device: torch.device,
                  log: Callable[[str], None]) -> int:
    """``--finetune``: the fine-tuning section, merged into --out next to the pretraining results
    of its .json (kept as they are)."""
    prev = a.out.with_suffix(".json") if a.out else None
    res: dict[str, Any] = json.loads(prev.read_text()) if prev is not None and prev.is_file() else {}
    for r in res.get("presets", {}).values():  # JSON turned the profile tuples into lists
        r["profile"] = {n: (t, [tuple(o) for o in ops]) for n, (t, ops) in r.get("profile", {}).items()}

    def write_partial(ft: dict[str, Any]) -> None:
        if a.out:
            write_json(dict(res, finetune=ft), a.out.with_suffix(".partial.json"))

    res["finetune"] = run_finetune(a, off, device, log, write_partial)
    text = markdown(res)
    write_results(a.out, res, text, log)
    print("\n".join(ft_markdown(res["finetune"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
