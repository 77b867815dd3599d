"""``multimae pseudolabel``: label rgb images with depth / semseg models into the folder layout (or shards).

    multimae pseudolabel --input photos/ --out data/mydata --split train \\
        --depth models/dpt --semseg models/mask2former-coco [--batch-size 8 --device auto]
"""
from __future__ import annotations

import argparse

from multimae.cli.options import command, precision_args


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub, "pseudolabel", run,
        help="label rgb images with depth / segmentation models (pseudo labels for pretraining)",
        description="Label every image of --input (a folder, recursively; a dataset's rgb/ directory; or .tar "
                    "shards) with a depth and/or a segmentation model (a Hugging Face model directory or a "
                    "multimae run / checkpoint directory) and write root/<split>/{rgb,depth,semseg}/<class>/"
                    "<name>.png. Re-running skips images already labelled.")
    p.add_argument("--input", required=True, help="image folder, a layout's rgb/ (or its split dir), or shards")
    p.add_argument("--out", required=True, help="dataset root to write (folder layout) or shard directory")
    p.add_argument("--split", default="train")
    p.add_argument("--depth", help="depth labeller: transformers depth-estimation model dir, or a multimae run")
    p.add_argument("--semseg", help="segmentation labeller: transformers Mask2Former/OneFormer/semantic model dir, "
                                    "or a multimae run")
    p.add_argument("--batch-size", type=int, default=8)
    precision_args(p)
    p.add_argument("--format", choices=("folder", "shards"), default="folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (--format shards)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="a corrupt input image: skip it (counted) or stop")
    p.add_argument("--depth-units", choices=("auto", "metric", "relative"), default="auto",
                   help="metric: stored in millimetres; relative: normalised per image (auto: from the model config)")
    p.add_argument("--semseg-labels", choices=("auto", "coco", "own"), default="auto",
                   help="coco: map to the 133 COCO panoptic ids by name; own: the model's label set")
    p.add_argument("--semseg-mode", choices=("semantic", "panoptic"), default="semantic",
                   help="universal models: per-pixel semantic argmax, or panoptic segments (gaps filled semantically)")
    p.add_argument("--image-size", type=int, default=None, help="multimae labeller: input size (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="label at most this many input images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from multimae.apps.pseudolabel.labelers import LabelerError
    from multimae.apps.pseudolabel.run import build_labelers, pseudolabel
    from multimae.core.config import ConfigError

    if args.depth is None and args.semseg is None:
        raise ConfigError("give --depth and/or --semseg (a model directory to label with)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    from multimae.apps.inference import open_input

    open_input(args.input)  # a bad --input fails (DataError, exit 2) before any model is loaded
    try:
        labelers = build_labelers(args.depth, args.semseg, args.device, args.precision, units=args.depth_units,
                                  label_set=args.semseg_labels, mode=args.semseg_mode, image_size=args.image_size)
        report = pseudolabel(args.input, args.out, labelers, split=args.split, batch_size=args.batch_size,
                             on_error=args.on_error, fmt=args.format, shard_size=args.shard_size,
                             progress=not args.no_progress, limit=args.limit)
    except LabelerError as e:
        raise ConfigError(str(e)) from e
    print(report.summary())
    print(f"wrote {', '.join(report.outputs)}")
    return 0
