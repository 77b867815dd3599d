"""``multimae data``: write synthetic scenes to disk, convert folders to shards, check a dataset.

    multimae data synthetic --out DIR --num N --size S --seed K --format folder|shards
    multimae data shards --folder ROOT --split train --modalities rgb,depth,semseg --out PATTERN [--resize 256]
    multimae data check --folder ROOT --split train --modalities rgb,depth,semseg
    multimae data stats --root ROOT [--split train] --config PRETRAIN.yaml | --modality '{"name": "s2", ...}'
    multimae data bench --source folder --root ROOT | --source shards --urls PATTERN [--num 200 --gpu-rate 1500]
    multimae data prepare nyuv2 --mat nyu_depth_v2_labeled.mat --splits splits.mat --mapping classMapping40.mat --out ROOT
    multimae data prepare ade20k --src ADEChallengeData2016 --out ROOT
    multimae data prepare imagenet --src DIR [--val-labels LOC_val_solution.csv | ILSVRC2012_validation_ground_truth.txt
                                   --devkit-meta meta.mat] --out ROOT
    multimae data prepare coco-captions --images train2017 --captions captions_train2017.json --split train --out ROOT
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from multimae.cli.options import command, names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="write synthetic data, convert folders to shards, check datasets")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    s = command(actions, "synthetic", _synthetic, help="render synthetic scenes to a folder tree or to shards")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--size", type=int, default=224, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("folder", "shards"), default="folder")
    s.add_argument("--split", default="train")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--start", type=int, default=0, help="first sample index (to extend a dataset)")
    s.add_argument("--bands", metavar="NAME", default=None,
                   help="folder format: also write each scene's extra bands (blue, green, red, nir, thermal; uint16, "
                        "nodata 0 outside the swath of a third of them) as a multi-band GeoTIFF modality NAME")
    _maps_arg(s)

    c = command(actions, "shards", _shards, help="convert a folder dataset to WebDataset shards (lossless copy)")
    c.add_argument("--folder", required=True, help="dataset root (root/<split>/<modality>/<class>/<name>.<ext>)")
    c.add_argument("--split", default="train")
    c.add_argument("--modalities", type=names, default="rgb,depth,semseg", help="comma-separated modality names")
    c.add_argument("--out", required=True, help="shard pattern, e.g. out/train-%%06d.tar")
    c.add_argument("--shard-size", type=int, default=1000)
    c.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    c.add_argument("--num-classes", type=int, default=None, help="override semseg num_classes for validation")
    c.add_argument("--resize", type=int, default=None, metavar="SIDE",
                   help="store samples resized to this shorter side (never enlarged; rgb re-encoded as JPEG q95 / "
                        "PNG, depth masked bilinear, semseg nearest): faster decoding for large sources, not lossless")
    _maps_arg(c)

    k = command(actions, "check", _check, help="decode and validate every sample of a folder dataset")
    k.add_argument("--folder", required=True)
    k.add_argument("--split", default="train")
    k.add_argument("--modalities", type=names,
                   help="comma-separated modality names (default: rgb,depth,semseg, or a --config's inputs and outputs)")
    k.add_argument("--config", help="a pretrain config (path or shipped name) whose model.modalities declare modalities "
                                    "such as multi-band rasters")
    k.add_argument("--num-classes", type=int, default=None, help="override semseg num_classes")
    k.add_argument("--missing", choices=("error", "skip", "allow"), default="error",
                   help="a sample lacking a modality's file: a problem (error, the default), left out (skip) or "
                        "kept (allow), as data.missing; the coverage per modality is printed in every case")

    b = command(actions, "bench", _bench,
                help="samples per CPU second of the training loader on your data, and cores per GPU")
    b.add_argument("--source", choices=("folder", "shards"), required=True)
    b.add_argument("--root", help="folder dataset root (--source folder)")
    b.add_argument("--split", default="train")
    b.add_argument("--urls", help="shards: brace pattern or comma list of .tar files (--source shards)")
    b.add_argument("--modalities", type=names, default="rgb,depth,semseg", help="comma-separated modality names")
    b.add_argument("--num-classes", type=int, default=None, help="override semseg num_classes for validation")
    b.add_argument("--num", type=int, default=200, help="samples to time (after a warm-up one)")
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--gpu-rate", type=float, default=1500.0, help="images/s one GPU trains at (default: ViT-B on an H100)")
    b.add_argument("--reference", action="store_true", help="time the reference path (data.fast_decode=false)")

    t = command(actions, "stats", _stats, help="per-band mean / std of raster modalities into ROOT/multimae_data.json",
                description="Stream a folder dataset's raster files (one at a time), compute each band's mean / std "
                            "over valid pixels (nodata excluded) and record them in ROOT/multimae_data.json, where "
                            "pretraining reads them.")
    t.add_argument("--source", choices=("folder",), default="folder")
    t.add_argument("--root", help="folder dataset root (default: the config's data.root)")
    t.add_argument("--split", default=None, help="split to measure (default: the config's data.split, else train)")
    t.add_argument("--config", help="a pretrain config (path or shipped name): its model.modalities declare the rasters")
    t.add_argument("--modalities", type=names,
                   help="comma-separated modality names (default: every raster of the config's inputs / outputs)")
    t.add_argument("--modality", action="append", default=[], metavar="JSON",
                   help='a raster spec as JSON, e.g. \'{"name": "s2", "kind": "dense", "channels": 3, '
                        '"bands": ["B04", "B03", "B08"], "nodata": 0}\' (repeatable)')
    t.add_argument("--limit", type=int, default=None, help="at most this many samples")
    t.add_argument("--on-error", choices=("raise", "skip"), default="raise")

    _register_prepare(actions)


def _common(p: argparse.ArgumentParser, link: bool = False) -> None:
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--format", choices=("folder", "shards"), default="folder")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per split (a quick subset)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (--format shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if link:
        p.add_argument("--link", choices=("copy", "hardlink", "symlink"), default="copy",
                       help="folder output: copy the image bytes (default) or link to the source files")


def _register_prepare(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("prepare", help="convert a public dataset's download into the folder layout (or shards)",
                           description="Write the folder layout pretrain / finetune read (or shards), with "
                                       "ROOT/multimae_data.json. Re-running resumes: finished files are skipped.")
    ds = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    n = command(ds, "nyuv2", _prepare, help="NYU Depth v2 labeled: rgb, depth (mm PNG), 40-class semseg; train/test")
    n.add_argument("--mat", required=True, help="nyu_depth_v2_labeled.mat (MATLAB v7.3)")
    n.add_argument("--splits", required=True, help="splits.mat (trainNdxs / testNdxs)")
    n.add_argument("--mapping", required=True, help="classMapping40.mat (mapClass)")
    _common(n)
    a = command(ds, "ade20k", _prepare,
                help="ADE20K scene parsing (ADEChallengeData2016): rgb + 150-class semseg; train/val")
    a.add_argument("--src", required=True, help="the ADEChallengeData2016 directory")
    a.add_argument("--object-info", help="objectInfo150.csv / .txt with the class names (default: the one in --src)")
    _common(a)
    i = command(ds, "imagenet", _prepare, help="ImageNet-1K: rgb/<wnid>/ for classification and pseudolabel; train/val")
    i.add_argument("--src", required=True, help="directory with train/<wnid>/*.JPEG and val/")
    i.add_argument("--val-labels", help="flat val/: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt")
    i.add_argument("--devkit-meta", help="the devkit's meta.mat (with ILSVRC2012_validation_ground_truth.txt)")
    _common(i, link=True)
    c = command(ds, "coco-captions", _prepare, help="COCO captions: the image-caption table (or shards) M3AE reads")
    c.add_argument("--images", required=True, help="image directory, e.g. train2017")
    c.add_argument("--captions", required=True, help="captions_train2017.json")
    c.add_argument("--split", default="train")
    c.add_argument("--per-sample", choices=("caption", "image"), default="caption",
                   help="one sample per caption, or per image (one of its captions drawn per epoch)")
    _common(c, link=True)


def _prepare(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError
    from multimae.data import prepare as P

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    common = dict(out=args.out, fmt=args.format, limit=args.limit, shard_size=args.shard_size,
                  progress=not args.no_progress)
    if args.dataset == "nyuv2":
        line = P.prepare_nyuv2(args.mat, args.splits, args.mapping, **common)
    elif args.dataset == "ade20k":
        line = P.prepare_ade20k(args.src, object_info=args.object_info, **common)
    elif args.dataset == "imagenet":
        line = P.prepare_imagenet(args.src, val_labels=args.val_labels, devkit_meta=args.devkit_meta,
                                  link=args.link, **common)
    else:
        line = P.prepare_coco_captions(args.images, args.captions, split=args.split, per_sample=args.per_sample,
                                       link=args.link, **common)
    print(line)
    return 0


def _maps_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--maps", choices=("zst", "png"), default="zst",
                   help="storage of depth and class maps in shards: zst (the same integers as a zstd-compressed "
                        ".npy, ~4x faster to read; default) or png (as older shards)")


def _specs(items: list, num_classes: int | None) -> list:
    """The specs of ``items`` (registered names or specs); ``num_classes``: of every categorical one."""
    from multimae.core import modalities

    specs = modalities.resolve(items)
    if num_classes is not None:
        specs = [s.with_(num_classes=num_classes) if s.kind == "categorical" else s for s in specs]
    return specs


def _synthetic(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from multimae.core.config import ConfigError
    from multimae.data.folder import write_folder
    from multimae.data.shards import write_shards
    from multimae.data.synthetic import LABEL_CLASSES, SyntheticScenes

    ds = SyntheticScenes(args.start + args.num, image_size=args.size, seed=args.seed)
    samples = Subset(ds, range(args.start, args.start + args.num))
    if args.bands and args.format != "folder":
        raise ConfigError("--bands writes GeoTIFF files into the folder format (--format folder)")
    if args.format == "folder":
        n = write_folder(samples, args.out, args.split, classes=LABEL_CLASSES)
        print(f"wrote {n} samples to {os.path.join(args.out, args.split)}")
        if args.bands:
            from multimae.data.synthetic import write_multispectral

            write_multispectral(args.out, args.split, args.bands, range(args.start, args.start + args.num),
                                args.size, args.seed)
            print(f"wrote their bands to {os.path.join(args.out, args.split, args.bands)} (.tif)")
    else:
        pattern = os.path.join(args.out, f"{args.split}-%06d.tar")
        paths = write_shards(samples, pattern, args.shard_size, compact=args.maps == "zst")
        print(f"wrote {args.num} samples to {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError
    from multimae.data.folder import FolderDataset
    from multimae.data.shards import count_samples, folder_samples, write_shards

    folder = FolderDataset(args.folder, args.split, _specs(args.modalities, args.num_classes), on_error=args.on_error)
    if args.resize is not None and args.resize < 1:
        raise ConfigError(f"--resize must be a positive shorter side in pixels, got {args.resize}")
    compact = args.maps == "zst"
    paths = write_shards(folder_samples(folder, resize=args.resize, compact=compact), args.out, args.shard_size,
                         compact=compact)
    written = count_samples(paths) if paths else 0
    print(f"wrote {written} samples to {len(paths)} shard(s); {folder.policy.summary(args.folder)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError
    from multimae.data.bench import bench, report
    from multimae.data.config import DataConfig
    from multimae.data.errors import DataError

    if (args.source == "folder") != bool(args.root) or (args.source == "shards") != bool(args.urls):
        raise ConfigError(f"--source {args.source} needs {'--root' if args.source == 'folder' else '--urls'} "
                          "(and not the other)")
    data = DataConfig(source=args.source, root=args.root, split=args.split, urls=args.urls,
                      fast_decode=not args.reference)
    try:
        result = bench(data, _specs(args.modalities, args.num_classes), num=args.num, image_size=args.image_size)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result, args.gpu_rate))
    return 0


def _stats_specs(args: argparse.Namespace) -> tuple[list, str | None, str]:
    """(raster specs, root, split) from --config / --modality / --modalities."""
    import json

    from multimae.core import modalities as M

    root, split, specs = args.root, args.split, []
    if args.config:
        cfg, specs = _config_specs(args.config, args.modalities)
        root = root or cfg.data.root
        split = split or cfg.data.split
        if not args.modalities:  # every raster of the config, by name
            specs = sorted((sp for sp in specs if sp.is_raster), key=lambda sp: sp.name)
    elif args.modalities:
        specs = M.resolve(args.modalities)
    for text in args.modality:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--modality {text!r}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"--modality {text!r}: expected a JSON object with name, kind, channels, bands, nodata")
        specs.append(M.resolve([d])[0])
    return specs, root, split or "train"


def _stats(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError
    from multimae.data.errors import DataError
    from multimae.data.stats import compute_stats, write_stats

    try:
        specs, root, split = _stats_specs(args)
        if not root:
            raise ValueError("--root (or a --config with data.root) is required")
        stats = compute_stats(root, split, specs, limit=args.limit, on_error=args.on_error)
    except (ConfigError, DataError, ValueError, KeyError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_stats(root, stats)
    for name, rec in stats.items():
        bands = rec["bands"] or list(range(len(rec["mean"])))
        print(f"{name}: {rec['files']} file(s), {len(bands)} band(s)")
        for b, m, sd, n in zip(bands, rec["mean"], rec["std"], rec["count"]):
            print(f"  {b!s:>8}  mean {m:12.4f}  std {sd:12.4f}  valid {n}")
    print(f"recorded in {os.path.join(root, 'multimae_data.json')}")
    return 0


def _config_specs(config: str, modalities: list[str] | None) -> tuple[Any, list]:
    """A pretrain config (path or shipped name) and the specs of ``modalities`` (default: its inputs
    and outputs) as its ``model.modalities`` declare them."""
    from multimae.core.config import load_config, resolve_config_path
    from multimae.tasks.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, resolve_config_path(config, kind="pretrain"), [])
    return cfg, cfg.model.specs(modalities or list(dict.fromkeys([*cfg.model.inputs, *cfg.model.outputs])))


def _check_specs(args: argparse.Namespace) -> list:
    """The modalities ``data check`` reads: ``--modalities`` (registered names), declared by a
    ``--config``'s ``model.modalities`` when one is given (its inputs and outputs by default)."""
    if not args.config:
        try:
            return _specs(args.modalities or ["rgb", "depth", "semseg"], args.num_classes)
        except KeyError as e:
            raise KeyError(f"{e.args[0]}; a modality declared in a run config: --config PRETRAIN.yaml") from None
    return _specs(_config_specs(args.config, args.modalities)[1], args.num_classes)


def _check(args: argparse.Namespace) -> int:
    from multimae.data.codecs import EXTS
    from multimae.data.errors import coverage_lines
    from multimae.core.config import ConfigError
    from multimae.data.folder import FolderDataset

    try:
        specs = _check_specs(args)
    except (ConfigError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    # every sample indexed (missing files too), so that coverage counts them and each is named
    folder = FolderDataset(args.folder, args.split, specs, on_error="skip", missing="allow")
    bad = folder.skipped
    left_out = 0
    split_dir = folder.root / folder.split
    for i in range(len(folder)):
        files = folder.files(i)
        lacking = [k for k in folder.specs if k not in files]
        if lacking and args.missing != "allow":
            if args.missing == "skip":
                left_out += 1
                continue
            cls, name = folder.key(i).split("/", 1)
            for k in lacking:  # report every problem, then fail
                print(f"sample {cls}/{name}: missing {k} file {split_dir / k / cls / name}.<"
                      f"{'|'.join(EXTS[folder.specs[k].kind])}>", file=sys.stderr)
            bad += 1
            continue
        try:
            folder.load(i)
        except Exception as err:  # report every problem, then fail
            print(err, file=sys.stderr)
            bad += 1
    print(f"coverage ({folder.listed} samples found):")
    for line in coverage_lines(folder.coverage, folder.listed):
        print(f"  {line}")
    skipped = f", {left_out} left out lacking a modality (--missing skip)" if left_out else ""
    print(f"{args.folder}/{args.split}: {len(folder) - left_out} indexed sample(s), {bad} bad{skipped}")
    return 1 if bad else 0
