"""Data throughput: samples per CPU second of the training loader's paths, side by side.

Everything runs on one CPU thread in the main process (``torch.set_num_threads(1)``). Loading
reads 256x256 samples from disk (rgb JPEG, 16-bit depth PNG, semseg PNG, written once as a folder
and converted to shards) and applies the pretraining transforms (RandomResizedCrop 0.2-1 + flip to
224x224, rgb normalisation, robust depth standardisation, semseg at 1/4) to rgb, depth and semseg.

Paths, measured in one run in alternating chunks (``--rounds``) so that load changes hit all alike:

* plain: what a user writes without this library (:func:`plain_sample`: Pillow, one torchvision v2
  RandomResizedCrop + flip over Image / Image / Mask, normalise, trimmed depth statistics);
* reference: ``decode_field`` tensors + ``PairedTransform(fast=False)`` (``data.fast_decode=false``);
* main fast: the fast path as main had it before issue 31 (PIL JPEG decoding, tarfile, PNG maps,
  main's depth statistics and rgb normalisation, :func:`main_fast_path`);
* fast: this fast path (simplejpeg, ``.zst`` maps in shards written by ``multimae data shards``).

Fast vs reference outputs are compared sample by sample with the same seeds. A per-step profile
of the fast path says where its time goes. The last part checks that ``build_loader`` keeps up
with a ViT-S step (``--step-seconds``, else ``benchmarks/results/vs_official.json``).

    python benchmarks/data_throughput.py [--num 200] [--quick] [--out benchmarks/results/data_throughput.md]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import tar_file_expander, url_opener
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from multimae.core import modalities
from multimae.data import codecs, shards, transforms
from multimae.data.codecs import decode_packed
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, folder_samples, write_shards
from multimae.data.synthetic import LABEL_CLASSES, SPEC_OVERRIDES, SyntheticScenes
from multimae.data.transforms import PairedTransform

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import cpu_name, write_text_atomic  # noqa: E402

PRETRAIN = ["rgb", "depth", "semseg"]
H100_IMG_S = 1500.0  # images/s one H100 trains ViT-B MultiMAE at (the figure): cores = 1500 / rate
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


def endless(make: Callable[[], Iterable]) -> Iterator:
    """The items of ``make()`` again and again (a small dataset read for more samples than it has)."""
    while True:
        yield from make()


def interleaved(paths: dict[str, Callable[[], Iterable]], n: int, rounds: int,
                contexts: dict[str, Callable[[], ContextManager]] | None = None) -> dict[str, tuple[float, float]]:
    """Samples per wall second and per CPU second of each path, ``n`` samples each, measured in
    ``rounds`` alternating chunks (A B A B ...) so that a change in machine load hits all alike.
    ``contexts``: a path's chunks run inside its context (e.g. :func:`main_fast_path`)."""
    contexts = contexts or {}
    its = {k: endless(make) for k, make in paths.items()}
    for k, it in its.items():
        with contexts.get(k, contextlib.nullcontext)():
            next(it)  # warm-up
    wall = {k: 0.0 for k in paths}
    cpu = {k: 0.0 for k in paths}
    chunk = max(1, n // rounds)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        for k, it in its.items():
            with contexts.get(k, contextlib.nullcontext)():
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


# --- (b) the plain pipeline a user would write -----------------------------------------------------

PLAIN_AUG = v2.Compose([v2.RandomResizedCrop(224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                        v2.RandomHorizontalFlip()])
PLAIN_NORM = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


def plain_sample(rgb: bytes, depth: bytes, semseg: bytes, depth_scale: float = 1e-3) -> dict:
    """One sample the way a user writes it without this library: Pillow decoding, one torchvision
    v2 RandomResizedCrop + flip applied jointly to Image / Image / Mask, normalisation, semseg at
    1/4, robust (trimmed 10%) depth standardisation over the valid pixels."""
    img = tv_tensors.Image(v2.functional.pil_to_tensor(Image.open(io.BytesIO(rgb)).convert("RGB")))
    d = np.asarray(Image.open(io.BytesIO(depth))).astype(np.float32) * depth_scale
    dep = tv_tensors.Image(torch.from_numpy(d)[None])
    sem = tv_tensors.Mask(torch.from_numpy(np.asarray(Image.open(io.BytesIO(semseg))).astype(np.int64))[None])
    img, dep, sem = PLAIN_AUG(img, dep, sem)
    sem = v2.functional.resize(sem, [56, 56], interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
    valid = dep > 0
    vals = dep[valid].sort().values
    n = vals.numel()
    kept = vals[int(0.1 * n): int(0.9 * n)] if n >= 20 else vals
    if kept.numel() > 1:
        dep = torch.where(valid, (dep - kept.mean()) / torch.sqrt(kept.var() + 1e-6), torch.zeros(()))
    return {"rgb": PLAIN_NORM(img).as_subclass(torch.Tensor), "depth": dep.as_subclass(torch.Tensor),
            "semseg": sem.as_subclass(torch.Tensor)}


def plain_folder(root: str) -> Callable[[], Iterable[dict]]:
    """The plain pipeline over a folder dataset's files (root/train/<modality>/<class>/<name>.<ext>)."""
    base = Path(root) / "train"
    files = [[next((base / m / p.parent.name).glob(f"{p.stem}.*")) for m in PRETRAIN]
             for p in sorted((base / "rgb").glob("*/*"))]

    def items() -> Iterator[dict]:
        for paths in files:
            yield plain_sample(*(p.read_bytes() for p in paths))
    return items


def plain_shards(urls: list[str]) -> Callable[[], Iterable[dict]]:
    """The plain pipeline over PNG-map shards read by webdataset (shuffle buffer 100)."""
    def items() -> Iterator[dict]:
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(100):
            yield plain_sample(s["rgb.jpg"], s["depth.png"], s["semseg.png"])
    return items


# --- (a) today's fast path (main before the compact storage): PIL JPEG, PNG maps, old transforms ----


def _main_robust_standardize_fast(depth: torch.Tensor, valid: torch.Tensor | None = None, trunc: float = 0.1,
                                  all_valid: bool = False) -> torch.Tensor:
    """main's depth statistics: np.partition at the two cut ranks, float64 sums."""
    x = depth.float()
    if valid is None and not all_valid:
        valid = torch.isfinite(x) & (x != 0)
    every = all_valid or bool(valid.all())
    v = (x.reshape(-1) if every else x[valid]).numpy()
    lo, hi = int(trunc * v.size), int((1 - trunc) * v.size)
    kept = (np.partition(v, (lo, hi - 1))[lo:hi] if hi - lo >= 2 else v).astype(np.float64)
    dev = kept - kept.mean()
    var = float(np.square(dev, out=dev).sum()) / max(kept.size - 1, 1)
    out = (x - torch.tensor(kept.mean(), dtype=torch.float32)).div_(torch.sqrt(torch.tensor(var, dtype=torch.float32) + 1e-6))
    return out if every else out.masked_fill_(~valid, 0.0)


_MEAN_STD = (torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1))


def _main_image_fast(x, box, size, spec, flip, norm):  # type: ignore[no-untyped-def]
    """main's rgb step: uint8 resize, then (x / 255 - mean) / std in three passes."""
    top, left, h, w = box
    out = transforms._bilinear(transforms._readonly_view(x.array).permute(2, 0, 1)[:, top:top + h, left:left + w], size)
    out = (out.flip(-1) if flip else out).contiguous().float() / 255.0
    return (out - _MEAN_STD[0]) / _MEAN_STD[1]


def _main_depth_fast(x, box, size, spec, flip, trunc):  # type: ignore[no-untyped-def]
    """main's depth step: the crop to float32, float32 antialiased resize, flip, main's statistics."""
    out, valid = transforms._dense_fast(x, box, size, spec)
    if flip:
        out, valid = out.flip(-1), (None if valid is None else valid.flip(-1))
    if valid is None:
        return _main_robust_standardize_fast(out, None, trunc, all_valid=True)
    return _main_robust_standardize_fast(out, valid.expand_as(out), trunc)


def _main_file_samples(url: str) -> Iterator[dict]:
    """main's tar reading: webdataset's expander (Python's tarfile)."""
    return tar_file_expander(url_opener([{"url": url}]))


@contextlib.contextmanager
def main_fast_path() -> Iterator[None]:
    """Run the fast path as main had it: PIL decodes JPEGs, tarfile reads shards, main's depth
    statistics and rgb normalisation (fed PNG maps, it is main's fast path; only the cached
    nearest-exact indices of semseg stay)."""
    patches = [(codecs, "simplejpeg", None), (transforms, "robust_standardize_fast", _main_robust_standardize_fast),
               (transforms, "_image_fast", _main_image_fast), (transforms, "_depth_fast", _main_depth_fast),
               (shards, "_file_samples", _main_file_samples)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


PATHS = ("plain", "reference", "main fast", "fast")


def three_paths(name: str, kind: str, root: str, png: list[str], zst: list[str], specs: list, n: int,
                rounds: int) -> dict:
    """The paths on one source, interleaved; and fast vs reference outputs with the same seeds."""
    tf, fast_tf = PairedTransform(specs, 224), PairedTransform(specs, 224, fast=True)
    if kind == "folder":
        ref = FolderDataset(root, "train", specs, transform=tf)
        fast = FolderDataset(root, "train", specs, transform=fast_tf, packed=True)
        each = {"reference": lambda: (ref[i] for i in range(len(ref))),
                "fast": lambda: (fast[i] for i in range(len(fast)))}
        paths = {"plain": plain_folder(root), "reference": each["reference"], "main fast": each["fast"],
                 "fast": each["fast"]}
    else:
        def stream(urls: list[str], t: PairedTransform, packed: bool) -> Callable[[], Iterable]:
            ds = ShardDataset(urls, specs, transform=t, shuffle_buffer=100, packed=packed)
            return lambda: iter(ds)
        paths = {"plain": plain_shards(png), "reference": stream(png, tf, False),
                 "main fast": stream(png, fast_tf, True), "fast": stream(zst, fast_tf, True)}
    rates = interleaved(paths, n, rounds, {"main fast": main_fast_path})
    for k, (wall, cpu) in rates.items():
        print(f"{name:<18} {k:<10} wall {wall:8.1f}  cpu {cpu:8.1f} samples/s", flush=True)
    a, b = PairedTransform(specs, 224, seed=7), PairedTransform(specs, 224, seed=7, fast=True)
    if kind == "folder":
        x, y = FolderDataset(root, "train", specs, transform=a), FolderDataset(root, "train", specs, transform=b,
                                                                               packed=True)
        agree = agreement((x[i] for i in range(len(x))), (y[i] for i in range(len(y))), n)
    else:
        agree = agreement(iter(ShardDataset(png, specs, transform=a, shuffle_buffer=0)),
                          iter(ShardDataset(zst, specs, transform=b, shuffle_buffer=0, packed=True)), n)
    return {"name": name, "rates": rates, **agree}


def _profile(urls: list[str], specs: list, n: int) -> dict[str, float]:
    """CPU seconds per sample of each step of the fast path over ``n`` samples of ``urls``."""
    ds = ShardDataset(urls, specs, shuffle_buffer=0, packed=True)
    tf = PairedTransform(specs, 224, fast=True, seed=0)
    cost: dict[str, float] = {}

    def clock(step: str, fn: Callable[[], object]) -> object:
        c = time.process_time()
        out = fn()
        cost[step] = cost.get(step, 0.0) + time.process_time() - c
        return out

    stream = endless(lambda: ds._raw_stream(list(range(len(urls))), list(urls), None, None))
    for _ in range(n):
        raw = clock("read tar entries", lambda: next(stream))
        meta = json.loads(raw.get("json", b"{}")).get("png_scale", {})
        sample = {"__key__": raw["__key__"]}
        for spec in specs:
            field = next(f for f in raw if f.split(".")[0] == spec.key and not f.startswith("__"))
            ext = field.split(".", 1)[1]
            sample[spec.key] = clock(f"decode {spec.key}", lambda: decode_packed(
                raw[field], ext, spec, float(meta.get(spec.key, 1e-3)), field))
        box, flip = clock("crop box + flip draw", lambda: tf.params(256, 256, tf._generator(sample)))
        for spec in specs:
            clock(f"transform {spec.key}", lambda: tf._apply_packed(sample[spec.key], spec, box, flip))
    return {k: v / n for k, v in cost.items()}


def step_profile(zst: list[str], png: list[str], specs: list, n: int) -> list[str]:
    """Where the fast path's time goes: per-step CPU time on compact shards and on PNG maps (what
    folders hold), one thread."""
    cols = {"compact shards (.zst maps)": _profile(zst, specs, n), "PNG maps (as in folders)": _profile(png, specs, n)}
    out = ["## Where the fast path's time goes (one thread)", "",
           f"CPU ms per sample of each step over {n} samples, the steps timed one by one (so the totals are a "
           "little above the interleaved rates); JPEG rgb in both, depth and semseg as .zst or 16-bit / 8-bit PNG.", "",
           "| step | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for step in next(iter(cols.values())):
        out.append(f"| {step} | " + " | ".join(f"{1e3 * c[step]:.3f} ({100 * c[step] / sum(c.values()):.0f}%)"
                                               for c in cols.values()) + " |")
    out.append("| total (samples per CPU second) | " + " | ".join(
        f"{1e3 * sum(c.values()):.3f} ({1 / sum(c.values()):.0f})" for c in cols.values()) + " |")
    for line in out:
        print(line)
    return out + [""]


def device_decode_section(root: str, zst: list[str], specs: list, n: int, rounds: int) -> list[str]:
    """``data.decode=cuda``: what the loader workers still spend per sample when the GPU decodes
    the rgb JPEGs (JPEG header, crop draw, depth and semseg), against the fast path decoding on the
    CPU, interleaved, one thread. The GPU's part is measured by ``benchmarks/gpu_check.py``
    (section ``jpeg_decode``)."""
    tf = PairedTransform(specs, 224, fast=True)
    cpu_f, enc_f = (FolderDataset(root, "train", specs, transform=tf, packed=p) for p in (True, "encoded"))
    paths = {"folder, CPU decode": lambda: (cpu_f[i] for i in range(len(cpu_f))),
             "folder, decode=cuda (workers)": lambda: (enc_f[i] for i in range(len(enc_f))),
             "shards, CPU decode": lambda: iter(ShardDataset(zst, specs, transform=tf, shuffle_buffer=100, packed=True)),
             "shards, decode=cuda (workers)": lambda: iter(ShardDataset(zst, specs, transform=tf, shuffle_buffer=100,
                                                                        packed="encoded"))}
    rates = interleaved(paths, n, rounds)
    out = ["## With the GPU decoding the JPEGs (`data.decode=cuda`)", "",
           "Samples per CPU second of the loader's work on one thread (in brackets the cores per H100 at "
           f"{H100_IMG_S:.0f} img/s): with `data.decode=cuda` a worker reads the JPEG header and draws the crop, "
           "the GPU decodes, crops and resizes (not included: see `benchmarks/gpu_check.py`, section `jpeg_decode`).", "",
           "| path | samples per CPU second |", "|---|---:|"]
    out += [f"| {k} | {c:.1f} ({H100_IMG_S / c:.1f}) |" for k, (_, c) in rates.items()]
    for line in out:
        print(line)
    return out + [""]


def paths_section(compare: list[dict], load: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    """The table of the paths side by side, cores per H100, and the fast vs reference agreement."""
    out = ["## The paths side by side (same run, interleaved)", "",
           f"Samples per CPU second on one thread; in brackets the cores one H100 needs at {H100_IMG_S:.0f} img/s "
           f"(= {H100_IMG_S:.0f} / rate). Goal: >= 750 from shards, >= 500 from folders. Load average "
           f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end (1 min).", "",
           "| source | " + " | ".join(PATHS) + " | fast / plain | fast / main fast |",
           "|---|" + "---:|" * (len(PATHS) + 2)]
    for c in compare:
        cpu = {k: c["rates"][k][1] for k in PATHS}
        out.append(f"| {c['name']} | " + " | ".join(f"{cpu[k]:.1f} ({H100_IMG_S / cpu[k]:.1f})" for k in PATHS)
                   + f" | {cpu['fast'] / cpu['plain']:.2f}x | {cpu['fast'] / cpu['main fast']:.2f}x |")
    out += ["", "Outputs of the same samples and seeds, fast vs reference path (shards: compact .zst maps vs "
            "the PNG shards they were converted from):", "",
            "| source | samples | rgb max abs diff | depth max abs diff | semseg identical |", "|---|---:|---:|---:|---:|"]
    out += [f"| {c['name']} | {c['samples']} | {c['rgb_max_abs']:.3g} | {c['depth_max_abs']:.3g} | "
            f"{c['semseg_equal']} |" for c in compare]
    out += ["", "Tolerance (tests/data/test_fast_path.py, test_compact_storage.py): semseg bit for bit, rgb within "
            "1e-6 (one fused multiply-add normalises it), depth within 1e-5 of max(1, |value|) on the tests' maps and "
            "within 1e-6 of the reference algorithm in float64 (the fast path computes in float64; the float32 "
            "reference is up to ~1e-4 from it on low-contrast crops, where mean / std is large). The plain pipeline draws its crops with torchvision's own RNG: "
            "compared for speed only.", ""]
    for line in out:
        print(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=200, help="samples per path and source")
    ap.add_argument("--rounds", type=int, default=8, help="alternating chunks of the interleaved comparison")
    ap.add_argument("--quick", action="store_true", help="a dry run: at most 24 samples, 3 rounds, no keep-up part")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="seconds per training step (batch 8) to compare the loader with (default: from vs_official.json)")
    ap.add_argument("--loader-batches", type=int, default=20)
    ap.add_argument("--skip-keep-up", action="store_true", help="skip the DataLoader / keep-up part")
    args = ap.parse_args(argv)
    if args.quick:
        args.num, args.rounds, args.skip_keep_up, args.loader_batches = min(args.num, 24), 3, True, 4
    torch.set_num_threads(1)
    n = args.num
    specs = modalities.resolve(PRETRAIN, SPEC_OVERRIDES)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(SyntheticScenes(n + 1, 256, seed=1, modalities=PRETRAIN + ["label"]), tmp, "train",
                     image_format="jpg", classes=LABEL_CLASSES)
        folder = FolderDataset(tmp, "train", specs)
        png = write_shards(folder_samples(folder), os.path.join(tmp, "png-%04d.tar"), 100)
        zst = write_shards(folder_samples(folder, compact=True), os.path.join(tmp, "zst-%04d.tar"), 100, compact=True)
        compare = [three_paths("folder 256->224", "folder", tmp, png, zst, specs, n, args.rounds),
                   three_paths("shards 256->224", "shards", tmp, png, zst, specs, n, args.rounds)]
        load = (load0, os.getloadavg())
        sizes = {k: sum(os.path.getsize(u) for u in urls) / (n + 1) / 1024 for k, urls in (("png", png), ("zst", zst))}
        lines = paths_section(compare, load) + [
            f"Shard bytes per sample: {sizes['png']:.1f} KiB with PNG maps, {sizes['zst']:.1f} KiB with .zst maps.", ""]
        lines += step_profile(zst, png, specs, n)
        lines += device_decode_section(tmp, zst, specs, n, args.rounds)
        rates = {c["name"].split()[0]: c["rates"]["fast"][1] for c in compare}
        if not args.skip_keep_up:
            lines += keep_up(args, specs, tmp, zst, rates)
    write_table(args.out, n, lines, load)
    return 0

def keep_up(args: argparse.Namespace, specs: list, folder_root: str, zst: list[str],
            one_thread: dict[str, float]) -> list[str]:
    """Training loader (default workers) vs the rate a ViT-S step consumes batches."""
    found = (args.step_seconds, "--step-seconds") if args.step_seconds else vit_s_step_seconds()
    workers = DataConfig().num_workers
    out = ["## Does the loader keep up?", ""]
    if found is None:
        return out + ["No step time: run `benchmarks/vs_official.py` first or pass `--step-seconds`.", ""]
    step_s, source = found
    need = KEEP_UP * STEP_BATCH / step_s  # samples/s
    out += [f"Training loader (`build_loader`, default `data.num_workers` = {workers}, batch {STEP_BATCH}, "
            f"Dirichlet masking in the collator) against a step of {step_s:.2f} s ({source}): it consumes "
            f"{STEP_BATCH / step_s:.1f} samples/s, so the loader must deliver >= {need:.1f} samples/s "
            f"({KEEP_UP:.0f}x). Workers needed at the measured one-thread rate: ceil({need:.1f} / rate).", "",
            "| source | loader samples/s (wall) | x step consumption | >= 3x | workers needed (1-thread rate) |",
            "|---|---:|---:|---|---:|"]
    for name, kind, data in (
            ("folder 256x256 JPEG/PNG -> 224", "folder", DataConfig(source="folder", root=folder_root)),
            ("shards 256x256 JPEG/.zst -> 224", "shards", DataConfig(source="shards", urls=",".join(zst),
                                                                     num_samples=args.num + 1))):
        rate_s = STEP_BATCH * loader_rate(data, specs, args.loader_batches)
        ratio = rate_s * step_s / STEP_BATCH
        out.append(f"| {name} | {rate_s:.1f} | {ratio:.1f}x | {'yes' if ratio >= KEEP_UP else 'NO'} | "
                   f"{max(1, math.ceil(need / one_thread[kind]))} |")
        print(out[-1], flush=True)
    out += ["", "The loader's workers share the machine's cores with the training step; on a 2-core machine "
            "they take CPU time from it. Rates measured while other jobs ran are lower bounds.", ""]
    return out


def write_table(path: str, n: int, lines: list[str], load: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    cpu = cpu_name()
    text = [
        "# Data throughput",
        "",
        f"Produced by `python benchmarks/data_throughput.py --num {n}` on {time.strftime('%Y-%m-%d')}: CPU "
        f"\"{cpu}\", {os.cpu_count()} CPUs (capability {torch.backends.cpu.get_cpu_capability()}), load average "
        f"{' / '.join(f'{x:.2f}' for x in load[0])} at the start and {' / '.join(f'{x:.2f}' for x in load[1])} after "
        f"the comparison (1 / 5 / 15 min); torch {torch.__version__}, Python {sys.version.split()[0]}.",
        "Pretraining transforms: RandomResizedCrop(0.2-1, 3/4-4/3) + hflip to 224x224 on rgb, depth, "
        "semseg; rgb normalised, depth robust-standardised, semseg at 56x56. CPU rates are samples per CPU "
        "second of the benchmark process on one thread: what one core delivers; a loaded machine lowers "
        "them too (shared caches and cores), so compare paths of one run.",
        "",
        *lines,
    ]
    write_text_atomic(path, "\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
