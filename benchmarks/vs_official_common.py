"""What both programs of the head-to-head with the official MultiMAE code share
(``vs_official.py``: pretraining; ``vs_official_finetune.py``: fine-tuning): importing the
official code from a checkout, interleaved timing of step functions, per-op profiles, the
peak-memory child process, and writing the results (markdown + JSON)."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch

import common

ROOT = common.ROOT
DEFAULT_OFFICIAL = ROOT.parent / "shared" / "official-multimae"
RESULTS = common.RESULTS / "vs_official.md"
SCRIPT = Path(__file__).resolve().with_name("vs_official.py")  # the entry both programs' children run
CHILD_TAG = "VS_OFFICIAL_CHILD "

Step = Callable[[dict[str, torch.Tensor]], dict[str, float]]


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



# ----------------------------------------------------------------------------- measuring
def timed(step: Step, x: dict[str, torch.Tensor], device: torch.device, cpu: list[float] | None = None) -> float:
    """Wall seconds of one step; appends the process's CPU seconds (all threads) to ``cpu``."""
    return common.timed(lambda: step(x), device, cpu)


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
        common.sync(device)
    ev = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    ev.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return total, [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ev[:top]]



def medians(times: dict[str, list[float]]) -> dict[str, float]:
    import statistics

    return {n: statistics.median(t) for n, t in times.items()}


def run_child(args: list[str], what: str) -> dict[str, Any] | None:
    """Run ``vs_official.py --child ...`` (one variant alone) and return the JSON it prints, or None
    (the failure goes to stderr)."""
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    print(f"memory child {what} failed (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
    return None


def child_result(res: dict[str, Any]) -> None:
    """What a ``--child`` process prints for :func:`run_child`."""
    print(CHILD_TAG + json.dumps(res))


# ----------------------------------------------------------------------------- results
def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def memory_cells(m: dict[str, Any], official: dict[str, Any] | None) -> str:
    """A memory table's measured cells of one variant ``m`` against the ``official`` one: peak RSS,
    RSS after import, RSS after build, peak vs official, step (peak - after build), step vs official."""
    o = official or {}
    off = o.get("peak_rss_mb")
    off_step = off - o["rss_after_build_mb"] if off else None
    st = m["peak_rss_mb"] - m["rss_after_build_mb"]
    return (f"{m['peak_rss_mb']:.0f} | {m['rss_after_import_mb']:.0f} | {m['rss_after_build_mb']:.0f} | "
            f"{ratio(m['peak_rss_mb'], off)} | {st:.0f} | {ratio(st, off_step)}")


def preset_label(p: str) -> str:
    return {"base": "ViT-B", "small": "ViT-S", "tiny": "ViT-Ti"}.get(p, p)


def profile_tuples(sections: dict[str, Any]) -> None:
    """JSON turned the profiles' (total, [(op, s, calls)]) tuples into lists: back to tuples, in place."""
    for r in sections.values():
        r["profile"] = {n: (t, [tuple(o) for o in ops]) for n, (t, ops) in (r.get("profile") or {}).items()}


def read_json(path: Path | None) -> dict[str, Any]:
    """A results .json (its profiles as tuples), or {} when there is none."""
    res: dict[str, Any] = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    profile_tuples(res.get("presets", {}))
    return res


def write_json(res: dict[str, Any], path: Path) -> None:
    """All results (medians, times, memory, profiles, ...): read by data_throughput.py and ``--render``."""
    common.write_json_atomic(path, res, indent=1)


def write_results(out: Path | None, res: dict[str, Any], text: str, log: Any) -> None:
    """The markdown report and its JSON, each written atomically (nothing without --out)."""
    if not out:
        return
    common.write_text_atomic(out, text + "\n")
    write_json(res, out.with_suffix(".json"))
    out.with_suffix(".partial.json").unlink(missing_ok=True)  # the per-round save, superseded
    log(f"wrote {out} and {out.with_suffix('.json').name}")

