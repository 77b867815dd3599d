#!/usr/bin/env python
"""Reproduce the MultiMAE and M3AE papers' findings in miniature on the built-in synthetic scenes.

Pretraining arms, all at the same optimizer steps, batch and model (nano, 64 px, 8 px patches):

* ``multimae``: rgb + depth + semseg in and out, 32 visible tokens split by Dirichlet(1)
  (``configs/pretrain/synthetic-tiny.yaml``);
* ``mae``: the same code and config with rgb only in and out, 32 visible tokens (of 64);
* ``m3ae``: rgb + caption, M3AE recipe (``configs/pretrain/synthetic-m3ae-tiny.yaml``);
* ``scratch``: no pretraining.

Transfer from every arm (``configs/finetune/synthetic-*.yaml``, downstream scenes from the seeds
1000000+ streams, disjoint from pretraining): semantic segmentation from rgb, depth and rgb+depth
(mIoU); depth from rgb (delta1, AbsRel); classification of the dominant object type from rgb
(fine-tuned top-1) and a linear probe (top-1); out-of-distribution detection (a linear probe
trained on scenes whose dominant object is a box, cone or cylinder; held-out scenes dominated by a
sphere are OOD; AUROC of the max-softmax probability). Every cell over several seeds (the seed
changes pretraining and transfer).

    python benchmarks/reproduce.py                 # full run (~45-55 min on 2 shared CPU cores)
    python benchmarks/reproduce.py --quick --out /tmp/rq   # every stage for 2 steps (CI smoke)

Resumable: one run directory per (stage, arm, seed, task) under ``--out`` (default
``runs/reproduce``); a job whose result file exists is skipped, an interrupted pretraining or
fine-tune resumes from its last checkpoint. Writes ``benchmarks/results/reproduce.md`` /
``.json`` and ``docs/img/reproduce.png`` (``--quick``: into ``--out``).

The entry point; the parts are sibling modules: ``reproduce_plan`` (arms, tasks, budget, jobs),
``reproduce_jobs`` (the worker's jobs and the scheduler), ``reproduce_report`` (statistics, claims,
report, figure); the evaluation protocols are :mod:`multimae.evaluation.protocols`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path

from common import write_json_atomic  # noqa: E402
from reproduce_jobs import hms, run_job, schedule  # noqa: E402
from reproduce_plan import (ALL_ARMS, ARMS, COLUMNS, DEFAULT_TASKS, FULL, PROBE_ATTR, PROBE_TEXT, QUICK, ROOT,  # noqa: E402
                            TASKS, Budget, Job, build_jobs, choose, parse_plan, result_file)
from reproduce_report import CLAIMS, collect, compare, draw_figure, judge, write_report  # noqa: E402

__all__ = ["ALL_ARMS", "ARMS", "CLAIMS", "COLUMNS", "DEFAULT_TASKS", "FULL", "PROBE_ATTR", "PROBE_TEXT", "QUICK", "TASKS",
           "Budget", "Job", "build_jobs", "collect", "compare", "draw_figure", "judge", "main", "result_file", "run_job",
           "schedule", "write_report"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every stage for a couple of steps, 1 seed (CI smoke)")
    ap.add_argument("--out", default=None, help="run directories (default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--workers", type=int, default=2, help="parallel jobs, one torch thread each (default 2)")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    ap.add_argument("--stop-at", default=None, help="UTC time HH:MM after which no new job starts; the report "
                    "is written with what finished (rerun to complete)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from existing runs")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining steps of every arm")
    ap.add_argument("--ft-epochs", type=int, default=None, help="override the semseg / depth fine-tuning epochs")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ALL_ARMS)} (default "
                    f"{','.join(ARMS)})")
    ap.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--plan", default=None, help="priority stages instead of --arms/--tasks: 'ARMS/TASKS[/SEEDS];...' "
                    "(comma lists; SEEDS default all of --seeds); stage by stage, each seed by seed; the report "
                    "covers the union of arms and tasks and --seeds seeds")
    ap.add_argument("--note", action="append", default=[], help="a paragraph added under 'Wall time' (repeatable)")
    ap.add_argument("--tag", default=None, help="name of a variant run (an investigation): its runs go to "
                    "runs/reproduce-TAG and its results to benchmarks/results/reproduce-TAG.md/.json and "
                    "docs/img/reproduce-TAG.png, leaving the main results alone")
    args = ap.parse_args(argv)
    try:
        args.budget, args.stages = _budget(args)
    except ValueError as e:
        ap.error(str(e))
    return args


def _budget(args: argparse.Namespace) -> tuple[Budget, list | None]:
    """The budget of this invocation (quick or full, with the overrides) and the ``--plan`` stages."""
    over: dict[str, Any] = {k: v for k, v in (("seeds", args.seeds), ("pretrain_steps", args.pretrain_steps),
                                              ("ft_epochs", args.ft_epochs)) if v is not None}
    for name, allowed in (("arms", ALL_ARMS), ("tasks", tuple(TASKS))):
        chosen = choose(getattr(args, name), allowed, name)
        if chosen is not None:
            over[name] = chosen
    plan = None
    if args.plan:
        if args.arms or args.tasks:
            raise ValueError("--plan replaces --arms / --tasks")
        plan = parse_plan(args.plan)
        over["arms"] = tuple(dict.fromkeys(a for arms_s, _, _ in plan for a in arms_s))
        over["tasks"] = tuple(dict.fromkeys(t for _, tasks_s, _ in plan for t in tasks_s))
    budget = QUICK if args.quick else FULL
    return (Budget(**{**asdict(budget), **over}) if over else budget), plan


def _stop_at(text: str | None) -> float | None:
    """``--stop-at HH:MM`` (UTC) as epoch seconds: today, or tomorrow when that is over 12 h ago."""
    if not text:
        return None
    hh, mm = map(int, text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if t < now - dt.timedelta(hours=12):
        t += dt.timedelta(days=1)
    return t.timestamp()


def _add_timings(timings: dict[str, Any], records: dict[str, dict[str, Any]], wall_s: float) -> None:
    """Fold this invocation's job records into the run's ``timings.json`` content."""
    for stage in ("pretrain", "transfer"):
        recs = [r for k, r in records.items() if k.startswith(stage + "/") and r.get("status") == "ok"]
        st = timings["stages"].setdefault(stage, {"jobs": 0, "worker_s": 0.0, "span_s": 0.0, "invocations": 0})
        if recs:
            st["jobs"] += len(recs)
            st["worker_s"] += sum(r["wall_s"] for r in recs)
            st["span_s"] += max(r["end"] for r in recs) - min(r["start"] for r in recs)
            st["invocations"] += 1
    timings["records"] = records
    timings["total_wall_s"] = timings.get("total_wall_s", 0.0) + wall_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    budget = args.budget
    suffix = f"-{args.tag}" if args.tag else ""
    args.results_name = f"reproduce{suffix}"
    args.out = args.out or ("runs/reproduce-quick" if args.quick else f"runs/reproduce{suffix}")
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    results_dir = out if args.quick else ROOT / "benchmarks" / "results"
    figure = out / f"{args.results_name}.png" if args.quick else ROOT / "docs" / "img" / f"{args.results_name}.png"
    tfile = out / "timings.json"
    timings = json.loads(tfile.read_text()) if tfile.exists() else {"stages": {}, "total_wall_s": 0.0}
    t0 = time.time()
    jobs = build_jobs(budget, args.stages)
    if not args.report_only:
        print(f"reproduce: out {out}, {budget.seeds} seed(s), pretrain {budget.pretrain_steps} steps x "
              f"{budget.pretrain_batch}, fine-tune {budget.ft_steps} steps x {budget.ft_batch}", flush=True)
        records = schedule(jobs, out, budget, args.workers, _stop_at(args.stop_at))
        _add_timings(timings, records, time.time() - t0)
        write_json_atomic(tfile, timings)
    path = write_report(out, budget, args, timings, results_dir, figure, args.quick)
    print(f"wrote {path} and {figure} (elapsed {hms(time.time() - t0)})", flush=True)
    missing = [j.name for j in jobs if not result_file(out, j).exists()]
    if missing:
        print(f"{len(missing)} job(s) without a result: {missing[:5]}{' ...' if len(missing) > 5 else ''}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
