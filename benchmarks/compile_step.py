"""Compiled against eager training step on the CPU: ``torch.compile(fullgraph=True)`` of the
pretraining and fine-tuning forward + loss, as ``train.compile=true`` runs it.

Each workload builds one model, copies it (same weights), compiles the copy and gives each its
AdamW (``build_optimizer``); after warm-up (the compiled one's first step is the compile, timed on
its own) their timed ``train_step`` calls alternate (eager, compiled, eager, ...) on the same
seeded batches and plans, so other load on a shared machine slows both alike. Also reported: the
graphs dynamo captured (1 = the forward + loss whole, no recompile over the run's batches), the
host syncs of one eager step (``multimae.engine.host_sync``) and both first-step losses (same weights,
same batch: equal up to rounding; drop path is off so that they can be).

Workloads: ``pretrain`` (MultiMAE, rgb + depth + semseg in, 4 outputs, ``--visible`` tokens split
by ``dirichlet_plan``), ``m3ae`` (rgb + caption, shared decoder, ratio plan with padded captions),
``semseg`` / ``depth`` / ``cls`` (fine-tuning heads on rgb).

    python benchmarks/compile_step.py                       # -> benchmarks/results/compile_step.md
    python benchmarks/compile_step.py --preset small --size 224 --batch 8 --steps 10
    python benchmarks/compile_step.py --quick               # smoke check: nano, dynamo only, writes nothing
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from multimae.core.batch import Batch
from multimae.data.transfer import TARGET, TARGET_VALID
from multimae.engine.host_sync import HostSyncCounter
from multimae.engine.optim import build_optimizer
from multimae.engine.step import read_stats, train_step
from multimae.core.masking import dirichlet_plan, ratio_plan
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.core.perf import cpu_model, tune_malloc
from multimae.tasks.finetune import FinetuneObjective
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import load_average, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "compile_step.md"
WORKLOADS = ("pretrain", "m3ae", "semseg", "depth", "cls")
VOCAB, TEXT_LEN = 1000, 24


@dataclass
class Workload:
    """A model (forward returns ``.loss`` / ``.losses``) and its stream of ``(Batch, plan)``."""

    name: str
    model: torch.nn.Module
    micro: Callable[[torch.Generator], tuple[Batch, Any]]


def _images(args: argparse.Namespace, g: torch.Generator, *keys: str) -> dict[str, torch.Tensor]:
    B, S = args.batch, args.size
    make = {"rgb": lambda: torch.randn(B, 3, S, S, generator=g), "depth": lambda: torch.randn(B, 1, S, S, generator=g),
            "semseg": lambda: torch.randint(0, 40, (B, S // 4, S // 4), generator=g)}
    return {k: make[k]() for k in keys}


def pretrain_workload(args: argparse.Namespace) -> Workload:
    keys = ["rgb", "depth", "semseg"]
    model = MultiMAE(ModelConfig(preset=args.preset, image_size=args.size, inputs=keys, outputs=[*keys, "norm_rgb"],
                                 modalities={"semseg": {"num_classes": 40}}))
    counts = model.token_counts(args.size)

    def micro(g: torch.Generator) -> tuple[Batch, Any]:
        plan = dirichlet_plan(counts, args.batch, args.visible, 1.0, generator=g)
        return Batch(_images(args, g, *keys)), plan
    return Workload("pretrain", model, micro)


def m3ae_workload(args: argparse.Namespace) -> Workload:
    model = MultiMAE(ModelConfig(preset=args.preset, image_size=args.size, inputs=["rgb", "caption"],
                                 outputs=["rgb", "caption"], decoder="shared",
                                 modalities={"caption": {"num_classes": VOCAB, "max_len": TEXT_LEN}}))
    counts = model.token_counts(args.size, {"caption": TEXT_LEN})

    def micro(g: torch.Generator) -> tuple[Batch, Any]:
        ids = torch.randint(1, VOCAB, (args.batch, TEXT_LEN), generator=g)
        lengths = torch.randint(TEXT_LEN // 3, TEXT_LEN + 1, (args.batch,), generator=g)
        pad = torch.arange(TEXT_LEN)[None] >= lengths[:, None]
        batch = Batch({**_images(args, g, "rgb"), "caption": ids.masked_fill(pad, 0)}, pad={"caption": pad})
        plan = ratio_plan(counts, args.batch, {"rgb": 0.75, "caption": (0.5, 1.0)}, g, valid={"caption": ~pad})
        return batch, plan
    return Workload("m3ae", model, micro)


def finetune_workload(args: argparse.Namespace, kind: str) -> Workload:
    import torch.nn.functional as F

    from multimae.model.losses import berhu_loss

    heads = {"semseg": HeadConfig(kind="segmentation", num_classes=40), "depth": HeadConfig(kind="depth"),
             "cls": HeadConfig(kind="classification", num_classes=100)}
    enc = ModelConfig(preset=args.preset, image_size=args.size)
    model = TransferModel(TransferModelConfig(encoder=enc, inputs=["rgb"], head=heads[kind], drop_path=0.0))
    B, S = args.batch, args.size

    def loss(pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        t = batch[TARGET]
        if kind == "depth":
            return berhu_loss(pred.float(), t, batch[TARGET_VALID])
        return F.cross_entropy(pred.float(), t, ignore_index=255, reduction="sum") / (t != 255).sum().clamp_min(1)

    def micro(g: torch.Generator) -> tuple[Batch, Any]:
        t = _images(args, g, "rgb")
        if kind == "semseg":
            t[TARGET] = torch.randint(0, 40, (B, S, S), generator=g)
        elif kind == "cls":
            t[TARGET] = torch.randint(0, 100, (B,), generator=g)
        else:
            t[TARGET], t[TARGET_VALID] = torch.rand(B, 1, S, S, generator=g), torch.rand(B, 1, S, S, generator=g) > 0.2
        return Batch(t), None
    return Workload(kind, FinetuneObjective(model, loss, kind), micro)


def build(name: str, args: argparse.Namespace) -> Workload:
    torch.manual_seed(0)
    if name == "pretrain":
        return pretrain_workload(args)
    if name == "m3ae":
        return m3ae_workload(args)
    return finetune_workload(args, name)


class GraphCount:
    """Wraps a backend; counts the graphs dynamo hands it."""

    def __init__(self, backend: str) -> None:
        from torch._dynamo import lookup_backend

        self.backend, self.graphs = lookup_backend(backend), 0

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        self.graphs += 1
        return self.backend(gm, example_inputs)


def run_workload(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    w = build(name, args)
    eager = w.model
    compiled_model = copy.deepcopy(eager)
    count = GraphCount(args.backend)
    compiled = torch.compile(compiled_model, backend=count, fullgraph=True)
    opts = {"eager": build_optimizer(eager, lr=1e-4), "compiled": build_optimizer(compiled_model, lr=1e-4)}
    nets = {"eager": eager, "compiled": compiled}
    g = torch.Generator().manual_seed(args.seed)
    micros = [w.micro(g) for _ in range(args.warmup + args.steps)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    stats: dict[str, Any] = {}

    def step(which: str, micro: Any) -> float:
        tic = time.perf_counter()
        stats[which] = train_step(nets[which], [micro], opts[which], precision=args.precision, clip_grad=1.0)
        return time.perf_counter() - tic

    probe = {"eager": copy.deepcopy(eager)}  # the sync count's step must not advance the timed model
    with HostSyncCounter() as syncs:
        train_step(probe["eager"], [micros[0]], build_optimizer(probe["eager"], lr=1e-4), precision=args.precision)
    del probe
    compile_s = step("compiled", micros[0])
    step("eager", micros[0])
    first = {k: read_stats(v)["loss"] for k, v in stats.items()}  # the same weights and batch: equal
    for m in micros[1:args.warmup]:
        step("eager", m), step("compiled", m)
    for i, m in enumerate(micros[args.warmup:]):
        order = ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")
        for which in order:
            times[which].append(step(which, m))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    row = {"workload": name, "eager_s": e, "compiled_s": c, "speedup": e / c, "compile_s": compile_s,
           "graphs": count.graphs, "syncs": syncs.total, "loss_eager": first["eager"], "loss_compiled": first["compiled"]}
    log(f"{name}: eager {e:.3f} s/step, compiled {c:.3f} s/step ({e / c:.2f}x), compile {compile_s:.1f} s, "
        f"{count.graphs} graph(s), {syncs.total} host sync(s) per eager step")
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = load_average()[0]
    out = [
        "# Compiled vs eager training step (CPU)", "",
        f"`python benchmarks/compile_step.py {shlex.join(argv)}` -- {when}; {cpu_model()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}, "
        f"load average {load:.2f} at the end.",
        f"Preset {args.preset}, {args.size} px, batch {args.batch}, {args.precision}, backend {args.backend}, "
        f"fullgraph; {args.steps} timed steps each (interleaved), {args.warmup} warm-up; medians.", "",
        "| workload | eager s/step | compiled s/step | speed-up | compile s | graphs | host syncs / eager step "
        "| first loss eager / compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | failed: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['workload']} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['speedup']:.2f}x | "
                   f"{r['compile_s']:.1f} | {r['graphs']} | {r['syncs']} | {r['loss_eager']:.4f} / "
                   f"{r['loss_compiled']:.4f} |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=None,
                    help=f"comma list of {', '.join(WORKLOADS)} (default all; --quick: pretrain,semseg)")
    ap.add_argument("--preset", default=None, help="model preset (default tiny; --quick: nano)")
    ap.add_argument("--size", type=int, default=None, help="image size (default 224; --quick: 32)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8; --quick: 2)")
    ap.add_argument("--visible", type=int, default=None, help="visible tokens (pretrain; default 98; --quick: 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps each (default 6; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps each, the compile included")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --quick: eager, dynamo only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke check: nano, 32 px, dynamo only (backend eager), writes nothing")
    ap.add_argument("--out", type=Path, default=None, help=f"markdown table (default {RESULTS}; --quick: none)")
    args = ap.parse_args(argv)
    q = args.quick
    for key, full, quick in (("preset", "tiny", "nano"), ("size", 224, 32), ("batch", 8, 2), ("visible", 98, 8),
                             ("steps", 6, 1), ("backend", "inductor", "eager"),
                             ("workloads", ",".join(WORKLOADS), "pretrain,semseg")):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    if q:
        args.warmup = 1
    bad = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad}; choose from {', '.join(WORKLOADS)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    rows = []
    for name in args.workloads.split(","):
        try:
            rows.append(run_workload(name, args, lambda s: print(s, flush=True)))
        except Exception as e:  # one failing workload is recorded; the rest still run
            rows.append({"workload": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"{name}: FAILED {rows[-1]['error']}", flush=True)
    md = markdown(rows, args, argv)
    print(md)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        write_text_atomic(out, md)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
