"""Per-rank peak memory of one ViT-L MultiMAE pretraining step: 2-rank FSDP2 + activation
checkpointing against 2-rank DDP (``train.parallel`` / ``train.activation_checkpointing``,
:mod:`multimae.engine.parallel`), on the CPU over gloo.

Setting: the official MultiMAE-L sizes (ViT-L/16 encoder: dim 1024, depth 24, 16 heads; 256-d x 2
decoders with 8 heads), rgb + depth + semseg (133 classes) in and out at 224x224, 98 visible
tokens per sample (a seeded ``dirichlet_plan``), random inputs, fp32, batch 2 per rank, AdamW from
``build_optimizer``; a step is ``train_step`` (forward, backward, optimizer step). Each
configuration runs in a ``torchrun`` process group of its own (2 ranks, ``--threads`` torch
threads each): model built, wrapped as ``multimae pretrain`` wraps it, one warm-up step (it also
creates the AdamW moments), one measured step. FSDP configurations start as the Trainer does: the model built on the
meta device, sharded, then materialised shard by shard (:func:`multimae.engine.parallel.materialise`). Memory is the kernel's peak resident set of each
rank process (``VmHWM`` in /proc/self/status: everything, from the model build to the end of the
measured step, with the allocator tuning ``multimae pretrain`` applies unless
``--no-tune-malloc``); configurations alternate when ``--repeats`` > 1.

    python benchmarks/fsdp_memory.py                      # ddp vs fsdp+ac -> benchmarks/results/fsdp_memory.md
    python benchmarks/fsdp_memory.py --configs ddp,ddp+ac,fsdp,fsdp+ac --repeats 1
    python benchmarks/fsdp_memory.py --quick              # smoke check: nano, 32 px, writes nothing
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import ROOT, cpu_name, load_average, mem_available_gib, proc_status_kb, write_text_atomic  # noqa: E402

CONFIGS = {"ddp": ("ddp", False), "ddp+ac": ("ddp", True), "fsdp": ("fsdp", False), "fsdp+ac": ("fsdp", True)}


def _status_kb(field: str) -> int:
    kb = proc_status_kb(field)
    if kb is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kb


class _AnonPeak:
    """Samples RssAnon (private, anonymous resident memory: no shared libraries) every few ms in a
    thread; ``peak_kb`` is the highest value seen (torch ops release the GIL, so sampling goes on)."""

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self.peak_kb, self._stop = _status_kb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
        return self.peak_kb


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from multimae.engine import distributed as D
    from multimae.engine import parallel as P
    from multimae.core.masking import dirichlet_plan
    from multimae.model.multimae import ModelConfig, MultiMAE
    from multimae.core.perf import tune_malloc
    from multimae.engine.optim import build_optimizer
    from multimae.engine.step import train_step

    if not args.no_tune_malloc:
        tune_malloc()
    info = D.init_distributed("gloo")
    base_kb = _status_kb("VmRSS")  # imports and the process group: before any model memory
    anon = _AnonPeak()
    parallel, ac = CONFIGS[args.config]
    train = SimpleNamespace(parallel=parallel, activation_checkpointing=ac, precision="fp32", init=None, vis_every=0)
    mods = ["rgb", "depth", "semseg"]
    torch.manual_seed(0)
    meta = P.builds_on_meta(SimpleNamespace(meta_init=True), train, info)  # as the Trainer starts an FSDP run
    with P.parameters_on_meta(meta):
        model = MultiMAE(ModelConfig(preset=args.preset, image_size=args.size, patch_size=16, inputs=mods,
                                     outputs=mods, modalities={"semseg": {"num_classes": 133}}))
    phases = {"built": (_status_kb("VmRSS"), _status_kb("VmHWM"))}
    P.prepare_model(model, train, info)
    if meta:
        P.materialise(model, info.device)
    if args.trim:
        from multimae.core.perf import trim_malloc

        trim_malloc()
    phases["wrapped"] = (_status_kb("VmRSS"), _status_kb("VmHWM"))
    optimizer = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                no_decay_names=sorted(model.no_weight_decay()))
    net = P.wrap(model, train, info)
    g = torch.Generator().manual_seed(1 + info.rank)
    b, s = args.batch, args.size
    n = (s // 16) ** 2

    def batch():
        x = {"rgb": torch.randn(b, 3, s, s, generator=g), "depth": torch.randn(b, 1, s, s, generator=g),
             "semseg": torch.randint(0, 133, (b, s // 4, s // 4), generator=g)}
        return x, dirichlet_plan({m: n for m in mods}, b, args.visible, generator=g)

    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    x, plan = batch()
    t0 = time.perf_counter()
    warm = train_step(net, x, optimizer, plan)
    t_warm = time.perf_counter() - t0
    hwm_warm = _status_kb("VmHWM")
    phases["warm-up step"] = (_status_kb("VmRSS"), hwm_warm)
    x, plan = batch()
    t0 = time.perf_counter()
    stats = train_step(net, x, optimizer, plan)
    t_step = time.perf_counter() - t0
    res = {"config": args.config, "rank": info.rank, "world": info.world_size, "hwm_kb": _status_kb("VmHWM"),
           "base_kb": base_kb, "anon_peak_kb": anon.stop(), "phases": phases,
           "hwm_warm_kb": hwm_warm, "rss_kb": _status_kb("VmRSS"), "step_s": t_step, "warm_s": t_warm,
           "params": total, "local_params": local, "loss_warm": float(warm["loss"]), "loss": float(stats["loss"])}
    Path(args.out, f"{args.config}-rank{info.rank}.json").write_text(json.dumps(res))
    D.cleanup()


def _cpu() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def _mem_available_gb() -> float:
    return mem_available_gib()


def run_config(config: str, args: argparse.Namespace, out: Path, port: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", "--config", config, "--out", str(out),
           "--threads", str(args.threads), "--preset", args.preset, "--size", str(args.size),
           "--batch", str(args.batch), "--visible", str(args.visible)] + (["--no-tune-malloc"] if args.no_tune_malloc else []) + (["--trim"] if args.trim else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    load0, t0 = load_average()[0], time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{config} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads((out / f"{config}-rank{k}.json").read_text()) for k in range(2)]
    for row in rows:
        row["wall_s"] = time.perf_counter() - t0
        row["load"] = (load0 + load_average()[0]) / 2
    print(f"{config}: peak RSS per rank {[round(x['hwm_kb'] / 2**20, 2) for x in rows]} GiB, "
          f"step {rows[0]['step_s']:.1f} s, load {rows[0]['load']:.1f}; rank 0 (VmRSS, VmHWM) GiB: base "
          f"{rows[0]['base_kb'] / 2**20:.2f}, " + ", ".join(f"{k} ({a / 2**20:.2f}, {b / 2**20:.2f})"
                                                       for k, (a, b) in rows[0]['phases'].items()), flush=True)
    return rows


def _peak(rep: list[dict], key: str) -> float:
    """Highest value over the ranks of one run, in KiB (``"net"``: VmHWM above the import baseline)."""
    return max(r["hwm_kb"] - r["base_kb"] if key == "net" else r[key] for r in rep)


def render(results: dict[str, list[list[dict]]], skipped: dict[str, str], args: argparse.Namespace,
           cmdline: str) -> str:
    gib = lambda kb: kb / 2**20  # noqa: E731
    base = {k: min(_peak(rep, k) for rep in results["ddp"]) for k in ("hwm_kb", "net", "anon_peak_kb")} \
        if results.get("ddp") else None

    def ratio(rep: list[dict], key: str) -> str:
        return f"{_peak(rep, key) / base[key]:.2f}x" if base else "-"

    lines = [
        "# Per-rank peak memory of a ViT-L MultiMAE pretraining step: FSDP2 + activation checkpointing vs DDP",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {_cpu()}; "
        f"MemAvailable at start {args.mem0:.1f} GiB; the machine was shared with other jobs (load column: "
        "1-min load average around each run).",
        f"- Command: `{cmdline}`",
        f"- Setting: preset `{args.preset}`{' (official MultiMAE-L: ViT-L/16 encoder dim 1024, depth 24, 16 heads; 256-d x 2 decoders, 8 heads)' if args.preset == 'large' else ''}, "
        "rgb + depth + semseg (133 classes) in and out, "
        f"{args.size}x{args.size}, {args.visible} visible tokens, fp32, batch {args.batch} per rank, 2 ranks "
        f"(torchrun, gloo), {args.threads} torch thread(s) per rank, AdamW; one warm-up step, one measured step.",
        "- `VmHWM`: the kernel's peak resident set of each rank process, from start to the end of the measured "
        "step (model build, wrapping, AdamW moments, activations, communication buffers). It includes the "
        "~1 GiB that importing torch (a CUDA build: its libraries are mapped) and multimae costs before any "
        "model exists; `above imports` subtracts that process's VmRSS measured just before the model is built. "
        "`RssAnon peak`: private anonymous memory only (no shared libraries), sampled every 5 ms in a thread. "
        "Ratios: the run's highest rank against the DDP run's highest rank. Each configuration ran in a "
        "torchrun process group of its own.",
        "",
        "| config | train.parallel | activation ckpt | params per rank (M) | VmHWM rank 0 / 1 (GiB) | vs ddp "
        "| above imports (GiB) | vs ddp | RssAnon peak (GiB) | vs ddp | measured step (s) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, reps in results.items():
        parallel, ac = CONFIGS[config]
        for rep in reps:
            lines.append(f"| {config} | {parallel} | {'yes' if ac else 'no'} | {rep[0]['local_params'] / 1e6:.1f} of "
                         f"{rep[0]['params'] / 1e6:.1f} | {gib(rep[0]['hwm_kb']):.2f} / {gib(rep[1]['hwm_kb']):.2f} | "
                         f"{ratio(rep, 'hwm_kb')} | {gib(_peak(rep, 'net')):.2f} | {ratio(rep, 'net')} | "
                         f"{gib(_peak(rep, 'anon_peak_kb')):.2f} | {ratio(rep, 'anon_peak_kb')} | "
                         f"{rep[0]['step_s']:.1f} | {rep[0]['load']:.1f} |")
    for config, why in skipped.items():
        lines.append(f"| {config} | {CONFIGS[config][0]} | {'yes' if CONFIGS[config][1] else 'no'} | not run: {why} "
                     "| | | | | | | | |")
    if base and results.get("fsdp+ac"):
        best = min(_peak(rep, "hwm_kb") for rep in results["fsdp+ac"])
        net = min(_peak(rep, "net") for rep in results["fsdp+ac"])
        lines += ["", f"FSDP + activation checkpointing: {best / base['hwm_kb']:.2f}x the DDP per-rank VmHWM "
                      f"({gib(best):.2f} vs {gib(base['hwm_kb']):.2f} GiB), {net / base['net']:.2f}x above the "
                      f"imports ({gib(net):.2f} vs {gib(base['net']):.2f} GiB); goal <= 0.5x: "
                      f"{'met' if best / base['hwm_kb'] <= 0.5 else 'not met'} on VmHWM, "
                      f"{'met' if net / base['net'] <= 0.5 else 'not met'} above the imports."]
        anon = min(_peak(rep, "anon_peak_kb") for rep in results["fsdp+ac"])
        lines += ["", f"Private memory (RssAnon peak, the imports' anonymous memory included): {anon / base['anon_peak_kb']:.2f}x "
                      f"({gib(anon):.2f} vs {gib(base['anon_peak_kb']):.2f} GiB). VmHWM also counts the resident pages of "
                      "the shared libraries (a CUDA build of torch: ~0.5 GiB here), which the two ranks share and which "
                      "the kernel evicts and reloads under memory pressure: they add the same amount to both sides "
                      "(which lifts FSDP's ratio) and vary by about 0.1 GiB between runs on a shared machine."]
    losses = {c: [round(rep[0]["loss_warm"], 4) for rep in reps] for c, reps in results.items()}
    lines += ["", f"Warm-up-step losses (rank 0; the same model, data and masks in every configuration): {losses}.",
              "", "Where the memory goes (fp32, 4 bytes per value): DDP keeps on every rank the whole model, its "
              "gradients, DDP's gradient buckets (a second copy of the gradients) and both AdamW moments; FSDP keeps "
              "1/2 of the parameters, gradients and moments per rank and gathers one transformer block at a time; "
              "activation checkpointing keeps only each block's input for the backward pass. Under FSDP the model "
              "is built on the meta device, sharded, and each rank allocates and initialises its own shards (as "
              "`multimae pretrain` starts an FSDP run: the initial weights of DDP), so no rank ever holds it whole."]
    return "\n".join(lines) + "\n"


def _need_gb(config: str, params: int) -> float:
    """Rough memory both ranks of a configuration need (GiB), to avoid starving a shared machine."""
    per_param = 20 if CONFIGS[config][0] == "ddp" else 12  # fp32 bytes per parameter per rank (see render)
    return 2 * (per_param * params / 2**30 + 1.5)


def _count_params(args: argparse.Namespace) -> int:
    """About the encoder's parameter count (12 dim^2 per block; the decoders add a few percent)."""
    from multimae.model.presets import preset

    p = preset(args.preset)
    return int(1.1 * 12 * p["depth"] * p["dim"] ** 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--configs", default="ddp,fsdp+ac", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the configs (alternating)")
    ap.add_argument("--preset", default="large")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2, help="per rank")
    ap.add_argument("--visible", type=int, default=98)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-tune-malloc", action="store_true")
    ap.add_argument("--trim", action="store_true", help="malloc_trim after wrapping (experiment)")
    ap.add_argument("--wait-mem", type=float, default=600,
                    help="seconds to wait for enough free memory before skipping a configuration")
    ap.add_argument("--quick", action="store_true", help="nano, 32 px, 6 visible tokens; writes nothing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp_memory.md"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.preset, args.size, args.visible = "nano", 32, 6
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {list(CONFIGS)}")
    args.mem0 = _mem_available_gb()
    cmdline = "python benchmarks/fsdp_memory.py " + shlex.join(sys.argv[1:])
    results: dict[str, list[list[dict]]] = {c: [] for c in configs}
    skipped: dict[str, str] = {}
    params = _count_params(args)
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for c in configs:
                need, waited = _need_gb(c, params), time.monotonic()
                while _mem_available_gb() < need and time.monotonic() - waited < args.wait_mem:
                    time.sleep(10)
                if _mem_available_gb() < need:
                    skipped[c] = f"needs ~{need:.0f} GiB, {_mem_available_gb():.1f} GiB available"
                    print(f"{c}: skipped, {skipped[c]}", flush=True)
                    continue
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                results[c].append(run_config(c, args, Path(tmp), port))
    results = {c: reps for c, reps in results.items() if reps}
    text = render(results, skipped, args, cmdline)
    print(text)
    if not args.quick:
        print(f"wrote {write_text_atomic(args.out, text)}")


if __name__ == "__main__":
    main()
