"""``multimae data``: write synthetic scenes to disk, convert folders to shards, check a dataset.

    multimae data synthetic --out DIR --num N --size S --seed K --format folder|shards
    multimae data shards --folder ROOT --split train --modalities rgb,depth,semseg --out PATTERN
    multimae data check --folder ROOT --split train --modalities rgb,depth,semseg
"""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="write synthetic data, convert folders to shards, check datasets")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    s = actions.add_parser("synthetic", help="render synthetic scenes to a folder tree or to shards")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--size", type=int, default=224, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("folder", "shards"), default="folder")
    s.add_argument("--split", default="train")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--start", type=int, default=0, help="first sample index (to extend a dataset)")
    s.set_defaults(func=_synthetic)

    c = actions.add_parser("shards", help="convert a folder dataset to WebDataset shards (lossless copy)")
    c.add_argument("--folder", required=True, help="dataset root (root/<split>/<modality>/<class>/<name>.<ext>)")
    c.add_argument("--split", default="train")
    c.add_argument("--modalities", default="rgb,depth,semseg", help="comma-separated modality names")
    c.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
    c.add_argument("--shard-size", type=int, default=1000)
    c.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    c.add_argument("--num-classes", type=int, default=None, help="override semseg num_classes for validation")
    c.set_defaults(func=_shards)

    k = actions.add_parser("check", help="decode and validate every sample of a folder dataset")
    k.add_argument("--folder", required=True)
    k.add_argument("--split", default="train")
    k.add_argument("--modalities", default="rgb,depth,semseg")
    k.add_argument("--num-classes", type=int, default=None, help="override semseg num_classes")
    k.set_defaults(func=_check)


def _specs(names: str, num_classes: int | None) -> list:
    from multimae import modalities

    specs = modalities.resolve([n.strip() for n in names.split(",") if n.strip()])
    if num_classes is not None:
        specs = [s.with_(num_classes=num_classes) if s.kind == "categorical" else s for s in specs]
    return specs


def _synthetic(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from multimae.data.folder import write_folder
    from multimae.data.shards import write_shards
    from multimae.data.synthetic import LABEL_CLASSES, SyntheticScenes

    ds = SyntheticScenes(args.start + args.num, image_size=args.size, seed=args.seed)
    samples = Subset(ds, range(args.start, args.start + args.num))
    if args.format == "folder":
        n = write_folder(samples, args.out, args.split, classes=LABEL_CLASSES)
        print(f"wrote {n} samples to {os.path.join(args.out, args.split)}")
    else:
        pattern = os.path.join(args.out, f"{args.split}-%06d.tar")
        paths = write_shards(samples, pattern, args.shard_size)
        print(f"wrote {args.num} samples to {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from multimae.data.folder import FolderDataset
    from multimae.data.shards import count_samples, folder_samples, write_shards

    folder = FolderDataset(args.folder, args.split, _specs(args.modalities, args.num_classes), on_error=args.on_error)
    paths = write_shards(folder_samples(folder), args.out, args.shard_size)
    written = count_samples(paths) if paths else 0
    print(f"wrote {written} samples to {len(paths)} shard(s); {folder.policy.summary(args.folder)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from multimae.data.folder import FolderDataset

    folder = FolderDataset(args.folder, args.split, _specs(args.modalities, args.num_classes), on_error="skip")
    bad = folder.skipped
    for i in range(len(folder)):
        try:
            folder.load(i)
        except Exception as err:  # report every problem, then fail
            print(err, file=sys.stderr)
            bad += 1
    print(f"{args.folder}/{args.split}: {len(folder)} indexed sample(s), {bad} bad")
    return 1 if bad else 0
