"""``multimae data prepare``: public datasets from their official downloads into the folder layout
(or shards) that ``pretrain`` / ``finetune`` read, with ``root/multimae_data.json`` recording the
depth PNG scale, the class names, the source files and the counts.

One module per dataset (:mod:`.nyuv2`, :mod:`.ade20k`, :mod:`.imagenet`, :mod:`.coco`) lists the
output samples; :mod:`.writing` writes them (atomic files, resume, progress bar). Each ``prepare_*``
function returns the closing line comparing the counts with the dataset's known split sizes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from multimae.data.prepare.writing import (
    METRIC_PNG_SCALE, closing_line, update_meta, write_bytes, write_items,
)

CLASSES_FILE = "semseg_classes.txt"  # one name per line, line i = class id i (as multimae pseudolabel writes)

__all__ = ["prepare_nyuv2", "prepare_ade20k", "prepare_imagenet", "prepare_coco_captions"]


def _record(root: Path, fmt: str, dataset: str, facts: dict, counts: Mapping[str, int], limit: int | None,
            png_scale: Mapping[str, float] | None = None, classes: list[str] | None = None) -> None:
    def update(meta: dict) -> None:
        if png_scale:
            meta["png_scale"] = {**meta.get("png_scale", {}), **png_scale}
        if classes is not None:
            meta["classes"] = list(classes)
        prev = meta.setdefault("prepare", {}).get(dataset, {})
        meta["prepare"][dataset] = {**facts, "counts": {**prev.get("counts", {}), **counts}, "limit": limit}

    update_meta(root, update, fmt)
    names = facts.get("semseg", {}).get("classes")
    if names:
        write_bytes(root / CLASSES_FILE, ("\n".join(names) + "\n").encode())


def prepare_nyuv2(mat: str | Path, splits: str | Path, mapping: str | Path, out: str | Path, fmt: str = "folder",
                  limit: int | None = None, shard_size: int = 1000, progress: bool = True) -> str:
    from multimae.data.prepare import nyuv2

    root = Path(out)
    items, facts, _ = nyuv2.items(Path(mat), Path(splits), Path(mapping), limit)
    scale = {"depth": METRIC_PNG_SCALE}
    report = write_items(items, root, fmt, shard_size=shard_size, png_scale=scale, progress=progress, desc="nyuv2")
    _record(root, fmt, "nyuv2", facts, report.per_split, limit, png_scale=scale)
    return f"{closing_line('nyuv2', report.per_split, nyuv2.KNOWN, limit)}; {report.summary()} to {root}"


def prepare_ade20k(src: str | Path, out: str | Path, fmt: str = "folder", limit: int | None = None,
                   shard_size: int = 1000, progress: bool = True, object_info: str | Path | None = None) -> str:
    from multimae.data.prepare import ade20k

    root = Path(out)
    items, facts, _ = ade20k.items(Path(src), limit, Path(object_info) if object_info else None)
    report = write_items(items, root, fmt, shard_size=shard_size, progress=progress, desc="ade20k")
    _record(root, fmt, "ade20k", facts, report.per_split, limit)
    return f"{closing_line('ade20k', report.per_split, ade20k.KNOWN, limit)}; {report.summary()} to {root}"


def prepare_imagenet(src: str | Path, out: str | Path, val_labels: str | Path | None = None,
                     devkit_meta: str | Path | None = None, fmt: str = "folder", limit: int | None = None,
                     shard_size: int = 1000, link: str = "copy", progress: bool = True) -> str:
    from multimae.data.prepare import imagenet

    root = Path(out)
    items, facts, wnids = imagenet.items(Path(src), Path(val_labels) if val_labels else None,
                                         Path(devkit_meta) if devkit_meta else None, limit)
    report = write_items(items, root, fmt, shard_size=shard_size, link=link, progress=progress, desc="imagenet")
    _record(root, fmt, "imagenet", {**facts, "files": link}, report.per_split, limit, classes=wnids)
    how = {"copy": "image bytes copied", "hardlink": "images hard-linked", "symlink": "images symlinked"}[link]
    return (f"{closing_line('imagenet', report.per_split, imagenet.KNOWN, limit)}; {report.summary()} to {root} "
            f"({how}; class index = position in the {len(wnids)} sorted wnids, the torchvision ImageFolder order)")


def prepare_coco_captions(images: str | Path, captions: str | Path, out: str | Path, split: str = "train",
                          per_sample: str = "caption", fmt: str = "folder", limit: int | None = None,
                          shard_size: int = 1000, link: str = "copy", progress: bool = True) -> str:
    from multimae.data.prepare import coco

    root = Path(out)
    items, rows, facts = coco.items(Path(images), Path(captions), split, per_sample, fmt, limit)
    report = write_items(items, root, fmt, shard_size=shard_size, link=link, progress=progress, desc="coco-captions")
    where = f"{root}"
    if fmt == "folder":
        table = root / f"captions_{split}.tsv"
        write_bytes(table, coco.table_bytes(rows, per_sample))
        where = f"{table} (data.source=captions data.root={table})"
    _record(root, fmt, f"coco-captions-{split}", {**facts, "files": link}, {split: report.per_split.get(split, 0)},
            limit)
    line = (f"{closing_line('coco-captions', {split: facts['images']}, coco.KNOWN_IMAGES, limit, 'images')}, "
            f"{closing_line('captions', {split: facts['captions']}, coco.KNOWN_CAPTIONS, limit, 'captions')}")
    return f"{line}; {report.summary()}; samples = one per {per_sample}; table/shards: {where}"
