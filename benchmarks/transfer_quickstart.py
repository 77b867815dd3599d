#!/usr/bin/env python
"""The transfer table of docs/finetuning.md (quick start transfer): every synthetic fine-tuning recipe and the linear probe, from the
quick-start checkpoint and from scratch, with the commands docs/finetuning.md shows.

    python benchmarks/transfer_quickstart.py [--init runs/synthetic-tiny] [--workers 2] [--tasks cls,semseg,...]

Runs ``multimae finetune --config configs/finetune/synthetic-<task>.yaml init=<init>`` (and
``init=scratch``) and ``multimae probe``, two at a time with one torch thread each (on a 2-core
machine two 1-thread processes beat one 2-thread process for models this small), into
``runs/transfer-quickstart/`` (a finished run, i.e. one with ``eval.json``, is not run again), and
writes ``benchmarks/results/transfer_quickstart.md`` from their ``eval.json`` files: metric per
task for pretrained and scratch next to the trivial baseline, with the wall time of every run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import cpu_name, load_average, write_json_atomic, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# task -> (CLI verb, config, metrics shown (first = headline), higher is better)
TASKS = {
    "cls": ("finetune", "configs/finetune/synthetic-cls.yaml", ["top1"], True),
    "semseg": ("finetune", "configs/finetune/synthetic-semseg.yaml", ["miou", "pixel_acc"], True),
    "depth": ("finetune", "configs/finetune/synthetic-depth.yaml", ["delta1", "absrel", "rmse"], True),
    "normals": ("finetune", "configs/finetune/synthetic-normals.yaml", ["angular_mean", "within_11_25"], False),
    "probe": ("probe", "configs/finetune/synthetic-probe.yaml", ["top1"], True),
}
LABEL = {"cls": "classification, 4 object types", "semseg": "segmentation, 6 classes", "depth": "depth, metres",
         "normals": "surface normals", "probe": "linear probe, 4 object types"}


def command(task: str, init: str, out: Path) -> list[str]:
    verb, config, _, _ = TASKS[task]
    name = f"{task}-{'scratch' if init == 'scratch' else 'pretrained'}"
    return [verb, "--config", config, f"init={init}", f"train.out_dir={out}", f"train.run_name={name}"]


def run(task: str, init: str, out: Path) -> dict:
    args = command(task, init, out)
    run_dir = out / args[-1].split("=", 1)[1]
    if (run_dir / "eval.json").is_file() and (run_dir / "wall.json").is_file():
        return {"task": task, "init": init, "dir": str(run_dir), "cached": True}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    with open(out / f"{run_dir.name}.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "multimae.cli.main", *args], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {r.returncode}); see {out / (run_dir.name + '.log')}")
    write_json_atomic(run_dir / "wall.json", {"wall_s": wall}, indent=None)
    return {"task": task, "init": init, "dir": str(run_dir), "cached": False}


def fmt(v: float | None, metric: str = "") -> str:
    """Errors in metres (AbsRel, RMSE, L1) to 3 decimals, percentages and degrees to 1."""
    return "-" if v is None else (f"{v:.3f}" if metric in ("absrel", "rmse", "l1") else f"{v:.1f}")


def report(out: Path, init: str, tasks: list[str], started: str) -> str:
    rows = ["| task (config) | metric | pretrained | scratch | trivial baseline | wall time pretrained / scratch |",
            "|---|---|---:|---:|---:|---|"]
    for task in tasks:
        _, config, metrics, _ = TASKS[task]
        res, walls = {}, {}
        for kind in ("pretrained", "scratch"):
            d = out / f"{task}-{kind}"
            res[kind] = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else None
            w = d / "wall.json"
            walls[kind] = f"{json.loads(w.read_text())['wall_s'] / 60:.1f} min" if w.is_file() else "-"
        for i, m in enumerate(metrics):
            vals = [fmt((r or {}).get("metrics", {}).get(m), m) for r in (res["pretrained"], res["scratch"])]
            base = (res["pretrained"] or res["scratch"] or {}).get("baseline", {}).get(m)
            head = f"{LABEL[task]} (`{Path(config).stem}`)" if i == 0 else ""
            rows.append(f"| {head} | {m} | {vals[0]} | {vals[1]} | {fmt(base, m)} | "
                        f"{(walls['pretrained'] + ' / ' + walls['scratch']) if i == 0 else ''} |")
    cpu = cpu_name()
    load = load_average()
    ends = sorted(dt.datetime.fromtimestamp(w.stat().st_mtime, dt.timezone.utc) for w in out.glob("*/wall.json"))
    span = f"{ends[0]:%Y-%m-%d %H:%M}-{ends[-1]:%H:%M} UTC" if ends else "-"
    return "\n".join([
        "# Transfer from the quick-start checkpoint vs from scratch (synthetic scenes)",
        "",
        f"Written by `python benchmarks/transfer_quickstart.py --init {init}` ({started}; the runs finished "
        f"{span}) on an {cpu}, {os.cpu_count()} cores, shared with "
        f"other jobs (load average {load[0]:.1f} when this file was written, 5-6 while the runs ran); two runs at a time, one torch thread each. "
        "Each row is one run per init (one seed): differences of a point or two are within seed noise "
        "(`benchmarks/results/reproduce.md` has 3-seed numbers at a smaller pretraining budget).",
        "",
        f"Pretrained = `init={init}` (`make run`: `configs/pretrain/synthetic-tiny.yaml`, finished); scratch = "
        "`init=scratch`, the same recipe. Scored on the 256 validation scenes (64 px, seeds disjoint from "
        "pretraining); trivial baseline = the best constant answer learnt from the training split. Metrics: top-1 "
        "%, mIoU / pixel accuracy %, depth δ1 % (AbsRel, RMSE in metres: lower is better), normals mean angular "
        "error in degrees (lower is better) and % of pixels within 11.25°.",
        "",
        *rows,
        "",
        "Commands (from the repository root; run names default to `ft-<kind>-<inputs>-<init name>`):",
        "",
        "```",
        *[f"multimae {' '.join(command(t, init, Path('runs'))[:4])}" for t in tasks],
        "# the same with init=scratch",
        "multimae evaluate --checkpoint runs/ft-segmentation-rgb-synthetic-tiny data.eval_split=test",
        "```",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/synthetic-tiny", help="the pretrained run (default: make run's)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "transfer-quickstart")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "transfer_quickstart.md")
    a = ap.parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"--tasks: unknown {bad}; choose from {list(TASKS)}")
    if not (ROOT / a.init).exists() and not Path(a.init).exists():
        ap.error(f"--init {a.init}: no such run (run `make run` first)")
    a.out.mkdir(parents=True, exist_ok=True)
    started = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    jobs = [(t, i) for t in tasks for i in (a.init, "scratch")]
    with cf.ThreadPoolExecutor(a.workers) as pool:
        futs = {pool.submit(run, t, i, a.out): (t, i) for t, i in jobs}
        for k, f in enumerate(cf.as_completed(futs), 1):
            t, i = futs[f]
            f.result()
            print(f"[{k}/{len(jobs)}] {t} init={i} done", flush=True)
    text = report(a.out, a.init, tasks, started)
    write_text_atomic(a.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
