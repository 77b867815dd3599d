"""ADE20K scene parsing (``ADEChallengeData2016``) -> ``root/{train,val}/{rgb,semseg}/all/<name>``.

Input: ``ADEChallengeData2016/images/{training,validation}/<name>.jpg`` and
``annotations/{training,validation}/<name>.png`` (uint8: 0 = other / unlabelled, 1..150 the
classes), and ``objectInfo150.txt`` (tab-separated, in the download) or ``objectInfo150.csv``
(the devkit's; columns
``Idx,Ratio,Train,Val,Name``) for the class names when present.

Output: the jpg bytes unchanged (images keep their size) as ``rgb/all/<name>.jpg`` and the labels
as ``semseg/all/<name>.png`` with ``0 -> 255`` (ignored) and ``k -> k - 1`` (150 classes 0..149).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from multimae.data.errors import DataError
from multimae.data.prepare.writing import Item

KNOWN = {"train": 20210, "val": 2000}
SPLITS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150
IGNORE = 255


def class_names(src: Path, path: Path | None = None) -> list[str] | None:
    """The 150 names (first name of each ``Name`` cell, before ';') from ``path``, else from
    ``src/objectInfo150.csv`` or ``.txt``; None without such a file."""
    if path is not None and not Path(path).is_file():
        raise DataError(f"{path}: not found (objectInfo150.csv / .txt)")
    path = path or next((src / f for f in ("objectInfo150.csv", "objectInfo150.txt") if (src / f).is_file()), None)
    if path is None:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    if not rows or "Idx" not in rows[0] or "Name" not in rows[0]:
        raise DataError(f"{path}: expected the columns Idx,Ratio,Train,Val,Name, got {list(rows[0]) if rows else []}")
    names: dict[int, str] = {}
    for r in rows:
        try:
            names[int(r["Idx"])] = r["Name"].split(";")[0].strip()
        except (TypeError, ValueError):
            raise DataError(f"{path}: Idx {r.get('Idx')!r} is not an integer") from None
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise DataError(f"{path}: expected Idx 1..{NUM_CLASSES}, got {len(names)} rows")
    return [names[i] for i in range(1, NUM_CLASSES + 1)]


def _convert(image: Path, ann: Path) -> dict[str, bytes | Path]:
    import torch

    from multimae.data.codecs import decode_categorical, encode_field, open_image

    try:
        img_data, ann_data = image.read_bytes(), ann.read_bytes()
    except OSError as e:
        raise DataError(f"{e.filename}: unreadable ({e.strerror})") from None
    size = open_image(img_data, f"image {image}").size
    raw = decode_categorical(ann_data, "png", f"annotation {ann}").numpy()
    if (raw.shape[1], raw.shape[0]) != size:
        raise DataError(f"annotation {ann}: {raw.shape[1]}x{raw.shape[0]} pixels, its image {image} is "
                        f"{size[0]}x{size[1]}")
    if raw.min() < 0 or raw.max() > NUM_CLASSES:
        raise DataError(f"annotation {ann}: ids [{raw.min()}, {raw.max()}] outside 0..{NUM_CLASSES}")
    lab = np.where(raw == 0, IGNORE, raw - 1).astype(np.int64)
    return {"rgb": img_data, "semseg": encode_field(torch.from_numpy(lab), "semseg")[1]}


def items(src: Path, limit: int | None = None, object_info: Path | None = None) -> tuple[list[Item], dict, list[str]]:
    src = Path(src)
    if not (src / "images").is_dir() or not (src / "annotations").is_dir():
        raise DataError(f"{src}: expected ADEChallengeData2016 with images/ and annotations/ directories")
    out: list[Item] = []
    for split, sub in SPLITS.items():
        idir, adir = src / "images" / sub, src / "annotations" / sub
        if not idir.is_dir():
            raise DataError(f"{idir}: not found (ADEChallengeData2016/images/{sub}/*.jpg)")
        images = sorted(p for p in idir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith("."))
        if not images:
            raise DataError(f"{idir}: no .jpg images")
        if limit is not None:
            images = images[:limit]
        for img in images:
            ann = adir / f"{img.stem}.png"
            if not ann.is_file():
                raise DataError(f"{ann}: missing annotation of {img}")
            out.append(Item(split, "all", img.stem, {"rgb": "jpg", "semseg": "png"},
                            lambda img=img, ann=ann: _convert(img, ann), str(img)))
    names = class_names(src, object_info) or [f"class_{i:03d}" for i in range(1, NUM_CLASSES + 1)]
    facts = {"source": {"src": str(src)},
             "semseg": {"num_classes": NUM_CLASSES, "ignore_index": IGNORE, "classes": names,
                        "mapping": "raw 0 (other) -> 255; raw k in 1..150 -> k - 1"}}
    return out, facts, names
