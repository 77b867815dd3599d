"""Pseudo-labelling throughput: images/s of ``multimae.apps.pseudolabel.pseudolabel`` end to end (read,
label, encode, atomic writes) on 2 CPU threads.

Labellers: the tiny random-init DPT and Mask2Former of :mod:`multimae.apps.pseudolabel.tiny` (toy sizes:
this measures the pipeline around the models more than the models), and a random-init MultiMAE-base
checkpoint (ViT-B encoder, depth + semseg decoders, 224x224 input; random weights label as fast as
trained ones). Inputs: scikit-image photos resized to mixed sizes (about 256-512 px on a side).

    python benchmarks/pseudolabel_throughput.py [--num 16] [--batch-size 8] [--out benchmarks/results/pseudolabel_throughput.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from multimae.apps.pseudolabel import build_labelers, pseudolabel
from multimae.apps.pseudolabel.tiny import save_random_multimae, save_tiny_dpt, save_tiny_mask2former

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import cpu_name, load_average, write_text_atomic  # noqa: E402

SIZES = [(256, 384), (480, 320), (300, 300), (512, 384), (240, 320), (384, 512), (333, 250), (400, 400)]


def make_photos(root: Path, num: int) -> Path:
    from skimage import data

    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    for i in range(num):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(srcs[i % len(srcs)]).resize((w, h)).save(root / f"img{i:04d}.jpg", quality=92)
    return root


def machine() -> str:
    cpu = cpu_name()
    import transformers

    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}")


def run(name: str, photos: Path, tmp: Path, batch_size: int, **paths) -> tuple[str, float, float, float]:
    """(name, images/s, wall seconds, CPU seconds of this process per image)."""
    labelers = build_labelers(paths.get("depth"), paths.get("semseg"), device="cpu", precision="auto")
    pseudolabel(photos, tmp / f"warm-{name}", labelers, batch_size=batch_size, progress=False, limit=batch_size)
    cpu = time.process_time()
    rep = pseudolabel(photos, tmp / f"out-{name}", labelers, batch_size=batch_size, progress=False)
    cpu = time.process_time() - cpu
    print(f"{name}: {rep.summary()}; {cpu:.1f} CPU s", flush=True)
    return name, rep.images_per_second, rep.seconds, cpu / max(rep.labelled, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/pseudolabel_throughput.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", args.num)
        dpt, m2f = save_tiny_dpt(tmp / "dpt"), save_tiny_mask2former(tmp / "m2f")
        base = save_random_multimae(tmp / "mmae-base")
        rows = [
            run("tiny DPT (depth)", photos, tmp, args.batch_size, depth=dpt),
            run("tiny Mask2Former (semseg, COCO 133)", photos, tmp, args.batch_size, semseg=m2f),
            run("tiny DPT + tiny Mask2Former", photos, tmp, args.batch_size, depth=dpt, semseg=m2f),
            run("MultiMAE-base, random init (depth + semseg, one forward)", photos, tmp, args.batch_size,
                depth=base, semseg=base),
        ]
    load_after = load_average()
    lines = [
        "# Pseudo-labelling throughput",
        "",
        f"`python benchmarks/pseudolabel_throughput.py --num {args.num} --batch-size {args.batch_size}`: "
        f"{args.num} JPEG photos of mixed sizes (240x320 to 512x384), labelled end to end (decode, labeller, "
        "resize back to each image's size, PNG encoding, atomic writes) on 2 CPU threads, fp32 "
        "(`--precision auto` found no native bf16 on this CPU); one warm-up batch first.",
        "",
        "| labeller | images/s (wall) | wall seconds | CPU seconds per image (both threads) |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {ips:.2f} | {s:.1f} | {c:.2f} |" for n, ips, s, c in rows],
        "",
        f"Machine: {machine()}.",
        f"Load average (1 min) {load_before[0]:.1f} before and {load_after[0]:.1f} after: the machine was shared "
        "with other jobs, so wall-clock numbers are noisy (compare rows of one run, not runs). The CPU seconds "
        "this process used per image depend much less on the other jobs; on an idle machine images/s would lie "
        "between 1 and 2 / (CPU seconds per image) (decoding and PNG encoding run on one thread).",
        "",
        "The tiny models are toys (about 0.2M and 0.35M parameters, 64 px / 48-96 px inputs): their rows show "
        "the cost of the pipeline around a model. The MultiMAE-base labeller has random weights, which label "
        "exactly as fast as trained ones; it resizes every image to 224x224 and runs the ViT-B encoder on all "
        "196 rgb tokens and the depth and semseg decoders once for both tasks.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
