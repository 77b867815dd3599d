"""``multimae predict``: a trained run's predictions on any images.

    multimae predict --checkpoint runs/ft-depth --input photos/ --out preds/ [--window]
"""
from __future__ import annotations

import argparse

from multimae.cli.options import command, names, precision_args


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub, "predict", run,
        help="predict with a fine-tuning or pretraining run on a folder, files or shards",
        description="Predict every image of --input with a fine-tuning run (classification top-k to "
                    "classification.jsonl; segmentation ids + colour PNG; depth 16-bit PNG + preview; other dense "
                    "targets .npy + preview) or a pretraining run (every decoder's prediction from --inputs), at each "
                    "image's upright original size; outputs mirror each input's relative path. Re-running with the "
                    "same run skips finished images (another run into the same OUT is refused); unreadable or "
                    "over-budget images are reported, skipped and counted. OUT/multimae_predict.json records the "
                    "run, scales, classes and counts.")
    p.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    p.add_argument("--input", required=True, nargs="+",
                   help="an image folder, image files, or .tar shards (files, a brace pattern or a comma list)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--inputs", type=names, help="input modalities, comma-separated (default: the run's / rgb)")
    p.add_argument("--pair", action="append", default=[], metavar="MODALITY=DIR",
                   help="directory of an extra input modality, files paired with --input's by relative path and "
                        "stem (a dataset's rgb/ input finds its sibling <modality>/ by itself); repeatable")
    p.add_argument("--batch-size", type=int, default=8)
    precision_args(p)
    p.add_argument("--window", action="store_true",
                   help="sliding-window inference (averaged overlapping windows) instead of letterboxing")
    p.add_argument("--topk", type=int, default=5, help="classification: classes per image")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="images with more pixels (read from the header) are reported as bad (0: no limit)")
    p.add_argument("--arrays", choices=("auto", "none", "float16", "float32"), default="auto",
                   help=".npy of dense predictions: auto = float16 for a fine-tuning run, none for a pretraining "
                        "run (previews only)")
    p.add_argument("--tiled", action="store_true",
                   help="large TIFF rasters: overlapping windows of the model's size at native resolution, blended, "
                        "read and written tile by tile (OUT/<name>.<task>.tif, georeferencing kept; memory bounded)")
    p.add_argument("--overlap", type=int, default=None, help="--tiled: window overlap in pixels (default: window/4)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from multimae.apps.predict import Predictor, predict_files
    from multimae.core.config import ConfigError

    bad = [x for x in args.pair if "=" not in x]
    if bad:
        raise ConfigError(f"--pair {bad[0]}: expected MODALITY=DIR")
    pairs = dict(x.split("=", 1) for x in args.pair)
    pred = Predictor.from_run(args.checkpoint, args.device, args.precision, args.inputs or None, args.window)
    if args.tiled:  # rasters larger than memory: multimae.apps.tiled
        from multimae.apps.tiled import predict_tiled_files
        c = predict_tiled_files(pred, args.input, args.out, overlap=args.overlap, batch_size=args.batch_size,
                                arrays=args.arrays, pairs=pairs, progress=not args.no_progress)
        print(f"predicted {c['predicted']} rasters ({c['already_done']} done before, {c['bad']} bad) -> {args.out}")
        return 0
    r = predict_files(pred, args.input, args.out, args.batch_size, not args.no_progress, args.topk,
                      pairs, max_pixels=args.max_pixels, arrays=args.arrays)
    print(f"predicted {r.predicted} images ({r.already_done} done before, {r.bad} bad) in {r.seconds:.1f}s "
          f"-> {args.out}", flush=True)
    return 0
