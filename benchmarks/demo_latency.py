"""Response time of ``multimae demo`` for the quick-start model: what a click costs.

Serves the demo in-process (uvicorn on 127.0.0.1) and times, over real HTTP, a prediction
request (the model call plus PNG encoding of every prediction and target, and JSON), the model
call alone (``model_ms`` of the response), an edit, and loading a new synthetic scene, for fp32
and bf16 autocast at 1 and 2 torch threads. The configurations are interleaved in rounds so that
load from other processes affects them alike; medians and 90th percentiles are reported.

    python benchmarks/demo_latency.py [--checkpoint runs/synthetic-tiny] [--rounds 10]
        [--out benchmarks/results/demo_latency.md]

Without ``--checkpoint`` a random-init model of ``configs/pretrain/synthetic-tiny.yaml`` is used
(the speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from multimae.checkpoint import save_checkpoint
from multimae.core.config import load_config, to_dict
from multimae.apps.demo import engine_from_checkpoint
from multimae.apps.demo.app import serving
from multimae.core.device import native_bf16
from multimae.model.multimae import MultiMAE
from multimae.tasks.pretrain_config import PretrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import load_average, write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def post(url: str, path: str, body: dict) -> tuple[dict, float]:
    req = urllib.request.Request(url.rstrip("/") + path, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
    return data, (time.perf_counter() - t0) * 1000


def quickstart_run(tmp: Path) -> Path:
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/synthetic-tiny.yaml", [])
    torch.manual_seed(0)
    save_checkpoint(tmp / "run", 0, MultiMAE(cfg.model).state_dict(), {"step": 0}, {"config": to_dict(cfg)})
    return tmp / "run"


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return f"{statistics.median(xs):.0f} / {p90:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5, help="prediction requests per configuration and round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or quickstart_run(Path(tmp))
        engine = engine_from_checkpoint(ckpt)
        configs = [(p, t) for p in ("fp32", "bf16") for t in (1, 2)]
        times: dict[tuple[str, int], dict[str, list[float]]] = {c: {"predict": [], "model": [], "edit": [], "scene": []}
                                                                for c in configs}
        load = [load_average()[0]]
        with serving(engine) as url:
            s, _ = post(url, "/api/sample", {"source": "synthetic", "index": 0})
            hidden, _ = post(url, "/api/mask", {"sample": s["id"], "budget": engine.default_visible,
                                                "alpha": engine.default_alpha, "seed": 0})
            for prec, th in configs:  # warm-up of every configuration
                engine.precision = prec
                torch.set_num_threads(th)
                post(url, "/api/predict", {"sample": s["id"], "hidden": hidden["hidden"]})
            for r in range(args.rounds):
                for prec, th in configs:
                    engine.precision = prec
                    torch.set_num_threads(th)
                    t = times[(prec, th)]
                    for _ in range(args.per_round):
                        out, ms = post(url, "/api/predict", {"sample": s["id"], "hidden": hidden["hidden"]})
                        t["predict"].append(ms)
                        t["model"].append(out["model_ms"])
                    _, ms_e = post(url, "/api/edit", {"sample": s["id"], "modality": "rgb", "patches": [0, 1, 2],
                                                      "hue": 90})
                    _, ms_s = post(url, "/api/sample", {"source": "synthetic", "index": r + 1})
                    t["edit"].append(ms_e)
                    t["scene"].append(ms_s)
        load.append(load_average()[0])

    cfg = engine.model.config
    lines = [
        "# `multimae demo` response time",
        "",
        f"`python benchmarks/demo_latency.py{' --checkpoint ' + str(args.checkpoint) if args.checkpoint else ''}`"
        f" ({args.rounds} rounds x {args.per_round} predictions per configuration, interleaved).",
        "",
        f"Model: preset {cfg.preset} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M parameters), "
        f"{engine.image_size}px, {engine.grid[0]}x{engine.grid[1]} patches per modality, "
        f"inputs {list(engine.inputs)}, {engine.default_visible} visible tokens.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{native_bf16('cpu')}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        "",
        "Milliseconds, median / 90th percentile. *predict*: HTTP round trip of one prediction request "
        "(model call, PNG encoding, JSON); *model*: the model call inside it; *edit*: an rgb hue edit; "
        "*scene*: rendering and loading a new synthetic scene.",
        "",
        "| precision | threads | predict | model | edit | scene |",
        "|---|---|---|---|---|---|",
    ]
    for (prec, th), t in times.items():
        lines.append(f"| {prec} | {th} | {stats(t['predict'])} | {stats(t['model'])} | {stats(t['edit'])} | "
                     f"{stats(t['scene'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    sys.exit(main())
