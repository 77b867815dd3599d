#!/usr/bin/env python
"""Which probe / OOD tasks can frozen features separate? A random encoder vs pretrained ones.

Before judging "captions improve the linear probe / OOD detection" (``benchmarks/reproduce.py``
C4 / C5) the tasks must measure representation quality at all: a random encoder has to score
clearly below a pretrained one. This runs every probe / OOD task of ``reproduce.py`` (same code,
scenes and probe recipe) on random encoders (``scratch``, several seeds: their spread) and on
pretrained encoders of a ``reproduce.py`` run, and marks a task *separates* when a pretrained
encoder scores at least ``--margin`` points above the random mean and above mean + 2 std of the
random encoders. Writes ``benchmarks/results/probe_task_check.md`` / ``.json``.

    python benchmarks/probe_task_check.py --runs runs/reproduce-m3ae800 --pretrained mae-s0,m3ae-s0
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce as rp  # noqa: E402
from common import write_json_atomic, write_text_atomic  # noqa: E402

TASKS = [t for t, (_, _, kind) in rp.TASKS.items() if kind in ("probe", "ood")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/reproduce-m3ae800", help="a reproduce.py run directory (its pretrain/)")
    ap.add_argument("--pretrained", default="mae-s0,m3ae-s0", help="pretraining runs ARM-sSEED under RUNS/pretrain")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--margin", type=float, default=3.0, help="points a pretrained encoder must clear the random mean by")
    ap.add_argument("--out", default="runs/probe-task-check", help="run directories of the probe jobs (may be the "
                    "--runs directory itself: finished jobs and cached features are reused)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph added below the table (repeatable)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "probe_task_check"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    runs, out = (Path(p) if Path(p).is_absolute() else ROOT / p for p in (args.runs, args.out))
    (out / "pretrain").parent.mkdir(parents=True, exist_ok=True)
    if not (out / "pretrain").exists():
        (out / "pretrain").symlink_to((runs / "pretrain").resolve())
    budget = rp.FULL
    encoders = [("scratch", s) for s in range(args.random_seeds)]
    for name in [p for p in args.pretrained.split(",") if p]:
        arm, seed = name.rsplit("-s", 1)
        if not (runs / "pretrain" / name / "pretrain_done.json").exists():
            ap.error(f"{runs / 'pretrain' / name} has no finished pretraining (pretrain_done.json)")
        encoders.append((arm, int(seed)))
    res: dict[str, dict[str, float]] = {}
    for arm, seed in encoders:
        for task in TASKS:
            job = rp.Job("transfer", arm, seed, task)
            f = rp.result_file(out, job)
            if not f.exists():
                rp.run_job(job, str(out), budget)
            metric = "auroc" if rp.TASKS[task][2] == "ood" else "top1"
            res.setdefault(f"{arm}-s{seed}", {})[task] = json.loads(f.read_text())["metrics"][metric]
            print(f"{arm}-s{seed} {task}: {res[f'{arm}-s{seed}'][task]:.1f}", flush=True)
    rand = [k for k in res if k.startswith("scratch-")]
    pre = [k for k in res if not k.startswith("scratch-")]
    verdict = {}
    L = ["# Probe / OOD task check: random vs pretrained frozen encoders", "",
         f"Written by `benchmarks/probe_task_check.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. "
         f"Command: `python benchmarks/probe_task_check.py --runs {args.runs} --pretrained {args.pretrained} "
         f"--random-seeds {args.random_seeds} --margin {args.margin}`.", "",
         f"Every task exactly as `benchmarks/reproduce.py` runs it (nano encoder, rgb input, mean of the final "
         f"tokens, BatchNorm + linear probe, {budget.probe_epochs} epochs, {budget.ft_train_scenes} training / "
         f"{budget.test_scenes} test scenes). Random = the `scratch` encoder (seeded init) of seeds "
         f"0-{args.random_seeds - 1}; pretrained = the `reproduce.py` pretraining runs named. A task *separates* "
         f"when some pretrained encoder scores >= {args.margin} points above the random mean and above random "
         f"mean + 2 std. Probe: top-1 %; OOD: AUROC %.", "",
         "| task | what | random (mean ± std) | " + " | ".join(pre) + " | separates |", "|---|---|---:|" + "---:|" * len(pre) + "---|"]
    for task in TASKS:
        vals = [res[k][task] for k in rand]
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
        ok = [k for k in pre if res[k][task] >= m + args.margin and res[k][task] > m + 2 * sd]
        verdict[task] = {"random_mean": m, "random_std": sd, "pretrained": {k: res[k][task] for k in pre},
                         "separates": bool(ok), "by": ok}
        attr, ood_in, ood_out = rp.PROBE_ATTR[task]
        what = rp.PROBE_TEXT[attr] + (f"; in {'/'.join(ood_in)}, OOD {'/'.join(ood_out)}" if ood_in else "")
        L.append(f"| `{task}` | {what} | {m:.1f} ± {sd:.1f} | " + " | ".join(f"{res[k][task]:.1f}" for k in pre) +
                 f" | {'yes (' + ', '.join(ok) + ')' if ok else 'no'} |")
    L.append("")
    for note in args.note:
        L += [note, ""]
    text = "\n".join(L) + "\n"
    print(text)
    write_text_atomic(args.results + ".md", text)
    write_json_atomic(args.results + ".json", {"raw": res, "verdict": verdict, "margin": args.margin})
    return 0


if __name__ == "__main__":
    sys.exit(main())
