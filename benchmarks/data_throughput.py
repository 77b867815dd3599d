"""Data throughput: samples/s of synthetic generation, folder loading and shard loading.

Everything runs on one CPU thread in the main process (``torch.set_num_threads(1)``) unless a
row says otherwise. Loading rows read 256x256 samples from disk and apply the pretraining
transforms (RandomResizedCrop 0.2-1 + flip to 224x224, rgb normalisation, robust depth
standardisation, semseg at 1/4) to rgb, depth and semseg.

Reference vs fast path: the reference decodes every file into the documented raw-sample tensors
(``decode_field``) and runs ``PairedTransform(fast=False)``; the fast path (what ``build_loader``
uses, ``data.fast_decode``) decodes into ``Packed`` integers (``packed=True``) and runs
``PairedTransform(fast=True)``. Both read the same files with the same seeds, measured in one run
in alternating chunks (``--rounds``), and the outputs are compared sample by sample (rgb and depth
max abs difference, semseg agreement).

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
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from multimae import modalities
from multimae.data import collate
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, folder_samples, write_shards
from multimae.data.synthetic import LABEL_CLASSES, SPEC_OVERRIDES, SyntheticScenes
from multimae.data.transforms import PairedTransform

PRETRAIN = ["rgb", "depth", "semseg"]
H100_IMG_S = 1500.0  # images/s one H100 trains ViT-B MultiMAE at (the issue's figure): cores = 1500 / rate
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


def endless(make: Callable[[], Iterable]) -> Iterator:
    """The items of ``make()`` again and again (a small dataset read for more samples than it has)."""
    while True:
        yield from make()


def interleaved(paths: dict[str, Callable[[], Iterable]], n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Samples per wall second and per CPU second of each path, ``n`` samples each, measured in
    ``rounds`` alternating chunks (A B A B ...) so that a change in machine load hits both alike."""
    its = {k: endless(make) for k, make in paths.items()}
    for it in its.values():
        next(it)  # warm-up
    wall = {k: 0.0 for k in paths}
    cpu = {k: 0.0 for k in paths}
    chunk = max(1, n // rounds)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        for k, it in its.items():
            w, c = time.perf_counter(), time.process_time()
            for _ in range(m):
                next(it)
            wall[k] += time.perf_counter() - w
            cpu[k] += time.process_time() - c
        done += m
    return {k: (n / wall[k], n / max(cpu[k], 1e-9)) for k in paths}


def agreement(ref: Iterable[dict], fast: Iterable[dict], n: int) -> dict[str, float]:
    """Fast vs reference outputs of the same samples: max abs differences and semseg agreement."""
    out = {"samples": 0, "rgb_max_abs": 0.0, "rgb_equal": 0, "depth_max_abs": 0.0, "semseg_agree": 0.0,
           "semseg_equal": 0}
    for a, b, _ in zip(ref, fast, range(n)):
        if a["__key__"] != b["__key__"]:
            raise RuntimeError(f"paths read different samples: {a['__key__']} vs {b['__key__']}")
        out["samples"] += 1
        out["rgb_max_abs"] = max(out["rgb_max_abs"], float((a["rgb"] - b["rgb"]).abs().max()))
        out["rgb_equal"] += int(torch.equal(a["rgb"], b["rgb"]))
        out["depth_max_abs"] = max(out["depth_max_abs"], float((a["depth"] - b["depth"]).abs().max()))
        out["semseg_agree"] += float((a["semseg"] == b["semseg"]).float().mean())
        out["semseg_equal"] += int(torch.equal(a["semseg"], b["semseg"]))
    out["semseg_agree"] = 100.0 * out["semseg_agree"] / max(out["samples"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=200, help="samples per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="seconds per training step (batch 8) to compare the loader with (default: from vs_official.json)")
    ap.add_argument("--loader-batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=8, help="alternating chunks of the reference vs fast comparison")
    ap.add_argument("--large", type=int, default=512, help="side of the large-source comparison (0: skip it)")
    ap.add_argument("--skip-keep-up", action="store_true", help="skip the DataLoader / keep-up part")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.num
    specs = modalities.resolve(PRETRAIN, SPEC_OVERRIDES)
    tf = PairedTransform(specs, 224)
    fast_tf = PairedTransform(specs, 224, fast=True)
    rows: list[tuple[str, float, float | None]] = []
    compare: list[dict] = []

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

        compare.append(compare_paths("folder 256->224", "folder", tmp, urls, specs, tf, fast_tf, n, args.rounds, add))
        compare.append(compare_paths("shards 256->224", "shards", tmp, urls, specs, tf, fast_tf, n, args.rounds, add))
        raw = ShardDataset(urls, specs, shuffle_buffer=100)
        packed = ShardDataset(urls, specs, shuffle_buffer=100, packed=True)
        dec = interleaved({"ref": lambda: iter(raw), "fast": lambda: iter(packed)}, n, args.rounds)
        add("shard loading + decoding only, no transforms, reference decode_field (1 thread)", dec["ref"])
        add("shard loading + decoding only, no transforms, packed decode (1 thread)", dec["fast"])
        loader = DataLoader(ShardDataset(urls, specs, transform=fast_tf, shuffle_buffer=100, samples_per_rank=4 * n,
                                         packed=True), batch_size=32, num_workers=2, collate_fn=collate)
        batches = rate(lambda: iter(loader), (4 * n) // 32 - 2)
        add(f"shard loading + transforms, fast path, DataLoader 2 workers, batch 32 ({os.cpu_count()} CPUs)",
            (32 * batches[0], None))

        keep = [] if args.skip_keep_up else keep_up(args, specs, tmp, rows)
    if args.large:
        with tempfile.TemporaryDirectory() as tmp:
            side = args.large
            src = SyntheticScenes(n + 1, side, seed=2, modalities=PRETRAIN + ["label"])
            write_folder(src, tmp, "train", image_format="jpg", classes=LABEL_CLASSES)
            compare.append(compare_paths(f"folder {side}->224", "folder", tmp, [], specs, tf, fast_tf, n,
                                         args.rounds, add))
            # the same samples stored pre-resized (multimae data shards --resize 256), fast path
            small = write_shards(folder_samples(FolderDataset(tmp, "train", specs), resize=256),
                                 os.path.join(tmp, "small-%04d.tar"), 100)
            ref_big = FolderDataset(tmp, "train", specs, transform=tf)
            fast_small = ShardDataset(small, specs, transform=fast_tf, shuffle_buffer=100, packed=True)
            r = interleaved({"ref": lambda: (ref_big[i] for i in range(len(ref_big))),
                             "fast": lambda: iter(fast_small)}, n, args.rounds)
            add(f"folder {side}->224 + pretraining transforms, reference path (1 thread, vs pre-resized)", r["ref"])
            add(f"shards {side} pre-resized to 256 (--resize 256) + transforms, fast path (1 thread)", r["fast"])
            compare.append({"name": f"shards {side} pre-resized to 256 (--resize 256) vs folder {side} reference",
                            "ref": r["ref"][1], "fast": r["fast"][1], "resampled": True})
    keep = fast_section(compare) + keep

    write_table(args.out, rows, n, keep)
    return 0


def compare_paths(name: str, kind: str, root: str, urls: list[str], specs: list, tf: PairedTransform,
                  fast_tf: PairedTransform, n: int, rounds: int, add: Callable) -> dict:
    """Reference vs fast path on the same folder / shards: interleaved rates and output agreement."""
    if kind == "folder":
        ref = FolderDataset(root, "train", specs, transform=tf)
        fast = FolderDataset(root, "train", specs, transform=fast_tf, packed=True)
        paths = {"ref": lambda: (ref[i] for i in range(len(ref))), "fast": lambda: (fast[i] for i in range(len(fast)))}
    else:
        ref = ShardDataset(urls, specs, transform=tf, shuffle_buffer=100)
        fast = ShardDataset(urls, specs, transform=fast_tf, shuffle_buffer=100, packed=True)
        paths = {"ref": lambda: iter(ref), "fast": lambda: iter(fast)}
    rates = interleaved(paths, n, rounds)
    add(f"{name} + pretraining transforms, reference path (1 thread)", rates["ref"])
    add(f"{name} + pretraining transforms, fast path (1 thread)", rates["fast"])
    # the same samples with the same seeds through both paths
    seeded_ref = PairedTransform(specs, 224, seed=7)
    seeded_fast = PairedTransform(specs, 224, seed=7, fast=True)
    if kind == "folder":
        a = FolderDataset(root, "train", specs, transform=seeded_ref)
        b = FolderDataset(root, "train", specs, transform=seeded_fast, packed=True)
        agree = agreement((a[i] for i in range(len(a))), (b[i] for i in range(len(b))), n)
    else:
        agree = agreement(iter(ShardDataset(urls, specs, transform=seeded_ref, shuffle_buffer=0)),
                          iter(ShardDataset(urls, specs, transform=seeded_fast, shuffle_buffer=0, packed=True)), n)
    return {"name": name, "ref": rates["ref"][1], "fast": rates["fast"][1], **agree}


def fast_section(compare: list[dict]) -> list[str]:
    """The reference vs fast table, the H100 core count and the agreement of the outputs."""
    out = ["## Fast path vs reference (same run, interleaved)", "",
           f"Samples per CPU second on 1 thread (decode + pretraining transforms); cores one H100 needs = "
           f"{H100_IMG_S:.0f} img/s / fast rate (goal <= 5, i.e. >= {H100_IMG_S / 5:.0f} samples/CPU-s).", "",
           "| source | reference samples/CPU-s | fast samples/CPU-s | speed-up | cores for 1500 img/s (ref -> fast) |",
           "|---|---:|---:|---:|---:|"]
    for c in compare:
        out.append(f"| {c['name']} | {c['ref']:.1f} | {c['fast']:.1f} | {c['fast'] / c['ref']:.2f}x | "
                   f"{H100_IMG_S / c['ref']:.1f} -> {H100_IMG_S / c['fast']:.1f} |")
    out += ["", "Outputs of the same samples and seeds through both paths:", "",
            "| source | samples | rgb identical | rgb max abs diff | depth max abs diff | semseg identical | "
            "semseg label agreement |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in compare:
        if c.get("resampled"):
            continue  # another image: not comparable pixel for pixel
        out.append(f"| {c['name']} | {c['samples']} | {c['rgb_equal']} | {c['rgb_max_abs']:.3g} | "
                   f"{c['depth_max_abs']:.3g} | {c['semseg_equal']} | {c['semseg_agree']:.2f}% |")
    out += ["", "rgb (after normalisation) and semseg are bit for bit the reference's; depth differs only by the "
            "summation of its robust statistics (selection + float64 sums instead of a sort + float32 sums), "
            "tolerance 1e-5 of max(1, |value|) (tests/data/test_fast_path.py). Pre-resized shards are another "
            "(resampled, re-encoded) image, so they are compared for speed only.", ""]
    for line in out:
        print(line)
    return out


def keep_up(args: argparse.Namespace, specs: list, folder_root: str, rows: list) -> list[str]:
    """Training loader (default workers) vs the rate a ViT-S step consumes batches."""
    found = (args.step_seconds, "--step-seconds") if args.step_seconds else vit_s_step_seconds()
    workers = DataConfig().num_workers
    one_thread = {"synthetic": next(r[2] for r in rows if r[0].startswith("synthetic 224x224 on the fly")),
                  "folder": next(r[2] for r in rows if r[0].startswith("folder 256->224") and "fast path" in r[0])}
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
