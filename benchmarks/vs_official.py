"""Head-to-head with the official MultiMAE code: one pretraining step, same process, same torch.

Setting (the official pretraining config): rgb, depth, semseg (133 classes) in; rgb, depth,
semseg and norm_rgb out; 224 px; batch 8; 98 visible tokens (Dirichlet alpha 1); AdamW. The
official step runs in fp32 as its script does on a CPU; this project's step runs in fp32 and in
bf16 autocast. The official code is imported at run time from a checkout (``--official PATH``,
default ``../shared/official-multimae``); nothing of it lives in this repository.

    python benchmarks/vs_official.py                          # base + small -> benchmarks/results/vs_official.md
    python benchmarks/vs_official.py --presets small --steps 7 --profile
    python benchmarks/vs_official.py --official /path/to/MultiMAE --out /tmp/vs.md

Fine-tuning (``--finetune``): the second program, ``vs_official_finetune.py`` (one step of each
official fine-tuning setting, official MultiViT against this project's transfer model); this
entry runs it with the same options. The pretraining results already in ``--out``'s .json are
kept; ``--ft-render`` merges runs. What both programs share is ``vs_official_common.py``.

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
import io
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path

import vs_official_finetune as FT  # noqa: E402
from common import (count_flops, current_rss_mb, gpu_peak_gb, machine_line, matmul_gflops, native_bf16,  # noqa: E402
                    nominal_peak, peak_rss_mb, reset_gpu_peak)
from vs_official_common import (DEFAULT_OFFICIAL, memory_cells, RESULTS, Step, child_result, interleaved, load_official,  # noqa: E402
                                medians, preset_label, profile_ops, profile_tuples, ratio, run_child, write_json,
                                write_results)

OFFICIAL_CONFIG = "cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml"
SEMSEG_CLASSES = 133
VISIBLE = 98
TARGETS = {"fp32": 1.15, "bf16": 2.0, "memory": 0.8}
FT_TASKS = FT.FT_TASKS


# ----------------------------------------------------------------------------- official code

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
        step, x = FT.ft_child(a, off, device)
    else:
        step, x = build_variants([a.child], off, a.preset, a, device)[a.child], make_batch(a.batch, device)
    built = current_rss_mb()
    reset_gpu_peak(device)
    for _ in range(a.child_steps):
        step(x)
    res = {"variant": a.child, "preset": a.preset, "task": a.finetune, "peak_rss_mb": peak_rss_mb(),
           "rss_after_import_mb": base, "rss_after_build_mb": built}
    if device.type == "cuda":
        res["cuda_peak_mb"] = gpu_peak_gb(device) * 1024
    child_result(res)
    return 0


def peak_memory(variant: str, preset: str, a: argparse.Namespace) -> dict[str, Any] | None:
    return run_child(["--child", variant, "--presets", preset, "--official", str(a.official), "--batch", str(a.batch),
                      "--threads", str(a.threads), "--device", a.device, "--child-steps", str(a.child_steps)]
                     + (["--compile", "on"] if a.compile_model else []), f"{variant}/{preset}")


# ----------------------------------------------------------------------------- report
def _header(res: dict[str, Any], a: argparse.Namespace) -> list[str]:
    dev = res["device"]
    lines = [
        "# This project vs the official MultiMAE code", "",
        f"Produced by `python benchmarks/vs_official.py {' '.join(res['argv'])}` on {res['date']}.", "",
        f"Machine: {res['machine']}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"{a.threads} threads, device `{dev}`. Official code: `{res['official']}`.", "",
        "Setting: the official pretraining config (rgb, depth, semseg with 133 classes in; rgb, depth, semseg, "
        f"norm_rgb out), 224 px, batch {a.batch}, {VISIBLE} visible tokens (Dirichlet alpha 1), AdamW; one step = "
        "depth standardisation, forward, losses, backward, optimizer step. The official step runs in fp32 as its "
        "script does on a CPU. Every variant warms up "
        f"({a.warmup} steps), then the variants' timed steps alternate round-robin in one process; medians of "
        f"{a.steps} steps. Peak memory: each variant alone in its own process ({a.child_steps} steps), peak resident "
        "set size of the whole process (`VmHWM` of /proc/self/status), which includes torch itself"
        + ("; on a GPU, `torch.cuda.max_memory_allocated`" if dev == "cuda" else "") + ".", ""]
    return lines + ([res["load_note"], ""] if res.get("load_note") else [])


def _speed(res: dict[str, Any], a: argparse.Namespace) -> list[str]:
    lines = ["## Speed", "", "| preset | official fp32 | ours fp32 | ours bf16 | speed-up fp32 | speed-up bf16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for p, r in res["presets"].items():
        med = r["median"]
        cell = lambda n: f"{med[n]:.2f} s/step ({a.batch / med[n]:.2f} img/s)" if n in med else r["skipped"].get(n, "—")  # noqa: E731
        lines.append(f"| {preset_label(p)} | {cell('official')} | {cell('fp32')} | {cell('bf16')} | "
                     f"{ratio(med.get('official'), med.get('fp32'))} | {ratio(med.get('official'), med.get('bf16'))} |")
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
                         f"{ratio(cm.get('official'), cm.get('fp32'))} | {ratio(cm.get('official'), cm.get('bf16'))} |")
    return lines + ["", "All timed steps (s): " + "; ".join(
        f"{preset_label(p)} {n}: {', '.join(f'{t:.2f}' for t in ts)}" for p, r in res["presets"].items()
        for n, ts in r["times"].items()), ""]


def _memory(res: dict[str, Any]) -> list[str]:
    if not any(r.get("memory") for r in res["presets"].values()):
        return []
    lines = ["## Peak memory", "", "Peak RSS: the whole process (the target's measure). Step: peak RSS minus the RSS "
             "once the model and optimizer are built (activations, gradients, optimizer state, allocator), "
             "which leaves out what importing the two code bases costs.", "",
             "| preset | variant | peak RSS (MB) | RSS after import (MB) | RSS after build (MB) | vs official | "
             "step (MB) | step vs official |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p, r in res["presets"].items():
        mem = r.get("memory") or {}
        lines += [f"| {preset_label(p)} | {n} | {memory_cells(m, mem.get('official'))} |"
                  for n, m in mem.items() if m is not None]
    return lines + [""]


def _rest(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if res["device"] == "cuda":
        lines += ["## GPU utilisation", ""] + [f"- {preset_label(p)} {n}: {u}" for p, r in res["presets"].items()
                                              for n, u in r.get("mfu", {}).items()] + [""]
    if res.get("losses"):
        lines += ["## First-step losses, fp32 vs bf16 (this project, same init, batch and masks)", ""] + res["losses"] + [""]
    lines += ["## Targets", ""] + res["verdicts"] + [""]
    for p, r in res["presets"].items():
        for n, (total, ops) in r.get("profile", {}).items():
            lines += [f"## Profile: {preset_label(p)} {n}, one step, top ops by self CPU time", "",
                      f"Sum of all ops' self CPU time: {total:.2f} s (torch.profiler; overhead inflates it).", "",
                      "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{k}` | {s:.3f} | {100 * s / total:.1f}% | {c} |" for k, s, c in ops] + [""]
    if res.get("notes"):
        lines += ["## Notes", ""] + res["notes"] + [""]
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The whole report: the pretraining sections, then the fine-tuning ones (when present)."""
    if not res.get("presets"):  # a fine-tuning run without pretraining results to keep
        return "\n".join(FT.ft_markdown(res["finetune"]))
    a = argparse.Namespace(**res["settings"])
    lines = _header(res, a) + _speed(res, a) + _memory(res) + _rest(res)
    if res.get("finetune"):
        lines += FT.ft_markdown(res["finetune"])
    return "\n".join(lines)


def _preset_verdict(r: dict[str, Any]) -> list[str]:
    med, mem, cpu, parts = r["median"], r.get("memory") or {}, r.get("cpu_median") or {}, []
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
            parts.append(f"memory {n} {m / off:.2f}x (target <= {TARGETS['memory']:.2f}x: "
                         f"{'met' if m / off <= TARGETS['memory'] else 'NOT met'})")
    return parts


def verdicts(res: dict[str, Any]) -> list[str]:
    return [f"- {preset_label(p)}: " + "; ".join(_preset_verdict(r)) for p, r in res["presets"].items()]


def render(paths: list[Path], a: argparse.Namespace) -> int:
    """Merge the JSON results of separate runs (e.g. one process per preset) into one markdown file."""
    import json

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
    profile_tuples(res["presets"])
    text = markdown(res)
    write_results(a.out, res, text, lambda _: None)
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
                    help=f"time fine-tuning steps instead of pretraining: comma-separated {', '.join(FT.FT_TASKS)} or all; "
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
        FT.parse_per_task(a.ft_size, "--ft-size"), FT.parse_per_task(a.ft_batch, "--ft-batch")  # fail early
        ours = [{"fp32": "ours"}.get(n, n) for n in a.variants.split(",") if n in ("official", "ours", "fp32")]
        a.variants = ",".join(dict.fromkeys(ours))
        if a.child is None:
            FT.ft_tasks(a)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return a

def _mfu(r: dict[str, Any], run: list[str], p: str, a: argparse.Namespace, device: torch.device,
         x: dict[str, torch.Tensor]) -> dict[str, str]:
    """On a GPU: img/s, TFLOP/s and the share of the measured and nominal bf16 matmul peaks per variant."""
    ours = [n for n in run if n != "official"]  # FLOPs counted on an eager copy of the model
    if not ours:
        return {}
    step = our_step(p, ours[-1], a.batch, device, compile_model=False)
    flops = count_flops(lambda: step(x))
    peak = matmul_gflops(device, torch.bfloat16, (4096, 8192))
    nominal, _ = nominal_peak(torch.cuda.get_device_name(device))
    out = {}
    for n, med in r["median"].items():
        if flops and n != "official":
            achieved = flops / med / 1e9
            out[n] = (f"{a.batch / med:.1f} img/s, {achieved / 1e3:.1f} TFLOP/s = {100 * achieved / peak:.1f}% "
                      f"of the measured bf16 matmul peak ({peak / 1e3:.0f} TFLOP/s)"
                      + (f", {100 * achieved / (nominal * 1e3):.1f}% of the nominal {nominal:.0f}" if nominal else ""))
    return out


def run_preset(p: str, names: list[str], off: dict[str, Any] | None, a: argparse.Namespace, device: torch.device,
               bf16_ok: bool, res: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """One preset: every variant warms up, then they alternate; profiles, MFU and memory as asked."""
    run = [n for n in names if n != "bf16" or bf16_ok]
    skipped = {} if bf16_ok or "bf16" not in names else {
        "bf16": "skipped: this CPU has no native bf16 (emulated bf16 matmuls run tens of times slower than fp32)"}
    steps = build_variants(run, off, p, a, device)
    x = make_batch(a.batch, device)

    def partial(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
        """After every round: the results so far, renderable with --render if the run is cut short."""
        res["presets"][p] = {"times": times, "median": medians(times), "cpu": cpu, "cpu_median": medians(cpu),
                             "skipped": skipped}
        res["verdicts"], res["load_note"] = [], f"(partial: {len(next(iter(times.values())))} rounds)"
        if a.out:
            write_json(res, a.out.with_suffix(".partial.json"))

    times, cpu = interleaved(steps, x, a, device, log, on_round=partial)
    r: dict[str, Any] = {"times": times, "median": medians(times), "cpu": cpu, "cpu_median": medians(cpu),
                         "skipped": skipped}
    if a.profile:
        r["profile"] = {n: profile_ops(s, x, device, a.top) for n, s in steps.items()}
    del steps
    if device.type == "cuda":
        r["mfu"] = _mfu(r, run, p, a, device, x)
    if not a.no_memory:
        r["memory"] = {n: peak_memory(n, p, a) for n in run}
    return r


def loss_rows(p: str, a: argparse.Namespace, device: torch.device) -> list[str]:
    """The first ``--loss-steps`` per-task losses of fp32 and bf16 side by side, with the verdict."""
    fl = first_losses(p, a.batch, device, a.loss_steps, ["fp32", "bf16"])
    rows = [f"{preset_label(p)}, steps 1-{a.loss_steps}:", "", "| step | task | fp32 | bf16 | rel. diff |",
            "|---:|---|---:|---:|---:|"]
    worst = 0.0
    for i, (l32, l16) in enumerate(zip(fl["fp32"], fl["bf16"])):
        for k in l32:
            d = abs(l16[k] - l32[k]) / max(abs(l32[k]), 1e-8)
            worst = max(worst, d)
            rows.append(f"| {i + 1} | {k} | {l32[k]:.5f} | {l16[k]:.5f} | {d:.2e} |")
    return rows + ["", f"Largest relative difference: {worst:.2e} (bf16 keeps 8 mantissa bits: ~4e-3 per rounding; "
                   f"tolerance used: 2e-2) -> {'within' if worst <= 2e-2 else 'OUTSIDE'} tolerance."]


def pretrain_main(a: argparse.Namespace, argv: list[str] | None, off: dict[str, Any] | None, device: torch.device,
                  log: Callable[[str], None]) -> int:
    names = a.variants.split(",")
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
        r = res["presets"][p] = run_preset(p, names, off, a, device, bf16_ok, res, log)
        log("  medians: " + ", ".join(f"{n} {m:.2f} s" for n, m in r["median"].items()))
    if a.loss_steps and bf16_ok and "bf16" in names:
        res["losses"] = loss_rows(a.presets.split(",")[-1], a, device)
    elif a.loss_steps:
        res["notes"].append("fp32/bf16 first-step losses not compared here (no bf16 run); "
                            "`tests/engine/test_bf16_losses.py` compares them on a small model.")
    load1 = os.getloadavg()
    res["load_note"] = (f"Load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs "
                        "(other jobs share the machine: absolute times are noisy, the interleaved ratios less so).")
    res["verdicts"] = verdicts(res)
    text = markdown(res)
    write_results(a.out, res, text, log)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(a)
    if a.render:
        return render(a.render, a)
    if a.ft_render:
        return FT.ft_render(a.ft_render, a, markdown)
    if not (a.official / "run_pretraining_multimae.py").is_file():
        print(f"vs_official: no official MultiMAE checkout at {a.official} (run_pretraining_multimae.py missing); "
              "pass --official PATH", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    off = load_official(a.official) if "official" in a.variants.split(",") else None

    def log(msg: str) -> None:
        print(msg, flush=True)

    if a.finetune:
        return FT.finetune_main(a, off, device, log, markdown)
    return pretrain_main(a, argv, off, device, log)


if __name__ == "__main__":
    sys.exit(main())
