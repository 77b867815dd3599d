"""Data throughput: samples/s of synthetic generation, folder loading and shard loading.

Everything runs on one CPU thread in the main process (``torch.set_num_threads(1)``) unless a
row says otherwise. Loading rows read 256x256 samples from disk and apply the pretraining
transforms (RandomResizedCrop 0.2-1 + flip to 224x224, rgb normalisation, robust depth
standardisation, semseg at 1/4) to rgb, depth and semseg.

    python benchmarks/data_throughput.py [--num 200] [--out benchmarks/results/data_throughput.md]

The last part checks that the training loader keeps up: ``build_loader`` with the default
``DataConfig`` (its default ``num_workers``), batch 8, synthetic scenes and a folder of real
JPEG/PNG files, in batches/s, against the rate a ViT-S step consumes them: by default the ViT-S
step time of ``benchmarks/results/vs_official.json`` (bf16 where it was measured, else fp32), or
``--step-seconds``. The loader must deliver at least ``KEEP_UP`` (3) times that rate; the table
also says how many workers it takes at the measured one-worker rate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader

from multimae import modalities
from multimae.data import collate
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, write_shards
from multimae.data.synthetic import LABEL_CLASSES, SPEC_OVERRIDES, SyntheticScenes
from multimae.data.transforms import PairedTransform

PRETRAIN = ["rgb", "depth", "semseg"]
KEEP_UP = 3.0  # the loader must deliver this many times what a training step consumes
STEP_BATCH = 8
VS_OFFICIAL = Path(__file__).parent / "results" / "vs_official.json"


def vit_s_step_seconds() -> tuple[float, str] | None:
    """Median ViT-S step (batch 8) of this project from vs_official.json: bf16 if measured, else fp32."""
    try:
        med = json.loads(VS_OFFICIAL.read_text())["presets"]["small"]["median"]
    except (OSError, KeyError, ValueError):
        return None
    for prec in ("bf16", "fp32"):
        if prec in med:
            return float(med[prec]), f"ViT-S {prec} step, {VS_OFFICIAL.name}"
    return None


def loader_rate(data: DataConfig, specs: list, n_batches: int) -> float:
    """Batches/s of the training loader (``build_loader``), after its first batch (worker start-up)."""
    spec = BatchSpec(tuple(specs), tuple(specs), 16, 224)
    loader, pos = build_loader(data, MaskConfig(), spec, seed=0, batch_size=STEP_BATCH)

    def batches() -> Iterable:
        for epoch in range(1 << 30):  # as many epochs as it takes (a small folder has few batches)
            pos.set_epoch(epoch, 0)
            yield from loader

    it = batches()
    next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches / (time.perf_counter() - t)


def rate(items: Callable[[], Iterable], n: int) -> tuple[float, float]:
    """Samples per wall-clock second and per CPU second of this process, for ``n`` items after a warm-up one.

    The CPU rate is what one core delivers even when other jobs share the machine; it does not
    count DataLoader worker processes.
    """
    it = iter(items())
    next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    count = 0
    for _ in it:
        count += 1
        if count >= n:
            break
    return count / (time.perf_counter() - wall), count / max(time.process_time() - cpu, 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=200, help="samples per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="seconds per training step (batch 8) to compare the loader with (default: from vs_official.json)")
    ap.add_argument("--loader-batches", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.num
    specs = modalities.resolve(PRETRAIN, SPEC_OVERRIDES)
    tf = PairedTransform(specs, 224)
    rows: list[tuple[str, float, float | None]] = []

    def add(name: str, value: tuple[float, float | None]) -> None:
        rows.append((name, *value))
        cpu = f"{value[1]:8.1f}" if value[1] is not None else "       -"
        print(f"{name:<80} wall {value[0]:8.1f}  cpu {cpu} samples/s", flush=True)

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return (n + 1) / (time.perf_counter() - wall), (n + 1) / (time.process_time() - cpu)

    add("synthetic generation 128x128, all modalities (1 thread)",
        rate(lambda: (SyntheticScenes(n + 1, 128)[i] for i in range(n + 1)), n))
    add("synthetic generation 224x224, all modalities (1 thread)",
        rate(lambda: (SyntheticScenes(n + 1, 224)[i] for i in range(n + 1)), n))
    syn = SyntheticScenes(n + 1, 224, modalities=PRETRAIN, transform=tf)
    add("synthetic 224x224 on the fly + pretraining transforms (1 thread)",
        rate(lambda: (syn[i] for i in range(n + 1)), n))

    with tempfile.TemporaryDirectory() as tmp:
        src = SyntheticScenes(n + 1, 256, seed=1, modalities=PRETRAIN + ["label"])
        add("write folder 256x256 (rgb jpg, depth 16-bit png, semseg png) incl. rendering",
            timed(lambda: write_folder(src, tmp, "train", image_format="jpg", classes=LABEL_CLASSES)))
        urls: list[str] = []
        add("write shards 256x256 (same encodings) incl. rendering",
            timed(lambda: urls.extend(write_shards(src, os.path.join(tmp, "shard-%04d.tar"), 100))))

        folder = FolderDataset(tmp, "train", specs, transform=tf)
        add("folder loading 256->224 + pretraining transforms (1 thread)",
            rate(lambda: (folder[i] for i in range(len(folder))), n))
        shards = ShardDataset(urls, specs, transform=tf, shuffle_buffer=100)
        add("shard loading 256->224 + pretraining transforms (1 thread)", rate(lambda: iter(shards), n))
        raw = ShardDataset(urls, specs, shuffle_buffer=100)
        add("shard loading + decoding only, no transforms (1 thread)", rate(lambda: iter(raw), n))
        loader = DataLoader(ShardDataset(urls, specs, transform=tf, shuffle_buffer=100, samples_per_rank=4 * n),
                            batch_size=32, num_workers=2, collate_fn=collate)
        batches = rate(lambda: iter(loader), (4 * n) // 32 - 2)
        add(f"shard loading + transforms, DataLoader 2 workers, batch 32 ({os.cpu_count()} CPUs)",
            (32 * batches[0], None))

        keep = keep_up(args, specs, tmp, rows)

    write_table(args.out, rows, n, keep)
    return 0


def keep_up(args: argparse.Namespace, specs: list, folder_root: str, rows: list) -> list[str]:
    """Training loader (default workers) vs the rate a ViT-S step consumes batches."""
    found = (args.step_seconds, "--step-seconds") if args.step_seconds else vit_s_step_seconds()
    workers = DataConfig().num_workers
    one_thread = {"synthetic": next(r[2] for r in rows if r[0].startswith("synthetic 224x224 on the fly")),
                  "folder": next(r[2] for r in rows if r[0].startswith("folder loading"))}
    out = ["## Does the loader keep up?", ""]
    if found is None:
        return out + ["No step time: run `benchmarks/vs_official.py` first or pass `--step-seconds`.", ""]
    step_s, source = found
    need = KEEP_UP * STEP_BATCH / step_s  # samples/s
    out += [f"Training loader (`build_loader`, default `data.num_workers` = {workers}, batch {STEP_BATCH}, "
            f"Dirichlet masking in the collator) against a step of {step_s:.2f} s ({source}): it consumes "
            f"{STEP_BATCH / step_s:.1f} samples/s, so the loader must deliver >= {need:.1f} samples/s "
            f"({KEEP_UP:.0f}x). Workers needed at the measured one-worker rate: ceil({need:.1f} / rate).", "",
            "| source | loader samples/s (wall) | x step consumption | >= 3x | workers needed (1-thread rate) |",
            "|---|---:|---:|---|---:|"]
    for name, data in (("synthetic 224x224, on the fly", DataConfig(source="synthetic", num_samples=512)),
                       ("folder 256x256 JPEG/PNG -> 224", DataConfig(source="folder", root=folder_root))):
        rate_s = STEP_BATCH * loader_rate(data, specs, args.loader_batches)
        kind = "synthetic" if data.source == "synthetic" else "folder"
        ratio = rate_s * step_s / STEP_BATCH
        out.append(f"| {name} | {rate_s:.1f} | {ratio:.1f}x | {'yes' if ratio >= KEEP_UP else 'NO'} | "
                   f"{max(1, math.ceil(need / one_thread[kind]))} |")
        print(out[-1], flush=True)
    out += ["", "The loader's workers share the machine's cores with the training step; on a 2-core machine "
            "they take CPU time from it. Rates measured while other jobs ran are lower bounds.", ""]
    return out


def write_table(path: str, rows: list[tuple[str, float, float | None]], n: int, extra: list[str] = ()) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = [
        "# Data throughput",
        "",
        "Produced by `python benchmarks/data_throughput.py` "
        f"(each row: {n} samples after a warm-up one; torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}, {cpu}, {os.cpu_count()} CPUs).",
        "Pretraining transforms: RandomResizedCrop(0.2-1, 3/4-4/3) + hflip to 224x224 on rgb, depth, "
        "semseg; rgb normalised, depth robust-standardised, semseg at 56x56.",
        "",
        "Wall: samples per elapsed second. CPU: samples per CPU second of the benchmark process, what one",
        "core delivers even when other jobs share the machine (not defined for the DataLoader row, whose",
        "work happens in worker processes).",
        "",
        "| what | samples/s (wall) | samples/s (CPU, 1 thread) |",
        "|---|---:|---:|",
        *[f"| {name} | {wall:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} |" for name, wall, cpu in rows],
        "",
        *extra,
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
