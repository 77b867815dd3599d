"""Data throughput: samples/s of synthetic generation, folder loading and shard loading.

Everything runs on one CPU thread in the main process (``torch.set_num_threads(1)``) unless a
row says otherwise. Loading rows read 256x256 samples from disk and apply the pretraining
transforms (RandomResizedCrop 0.2-1 + flip to 224x224, rgb normalisation, robust depth
standardisation, semseg at 1/4) to rgb, depth and semseg.

    python benchmarks/data_throughput.py [--num 200] [--out benchmarks/results/data_throughput.md]
"""
from __future__ import annotations

import argparse
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
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.shards import ShardDataset, write_shards
from multimae.data.synthetic import LABEL_CLASSES, SPEC_OVERRIDES, SyntheticScenes
from multimae.data.transforms import PairedTransform

PRETRAIN = ["rgb", "depth", "semseg"]


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

    write_table(args.out, rows, n)
    return 0


def write_table(path: str, rows: list[tuple[str, float, float | None]], n: int) -> None:
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
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
