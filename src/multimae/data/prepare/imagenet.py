"""ImageNet-1K (ILSVRC2012) -> ``root/{train,val}/rgb/<wnid>/<name>.jpeg``.

Input ``--src DIR``: ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/``, either in wnid folders too, or
flat (``ILSVRC2012_val_00000001.JPEG`` ...) with one of

* ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString`` with the wnid as the first
  token of ``PredictionString`` (``n01751748 x y x y ...``);
* ``ILSVRC2012_validation_ground_truth.txt`` (devkit): one ILSVRC2012 id (1..1000) per line, line
  i for ``ILSVRC2012_val_<i:08d>``, with the devkit's ``meta.mat`` (``synsets``: ``ILSVRC2012_ID``,
  ``WNID``, ``words``, ``num_children``; the leaf synsets with ids 1..1000 are the classes).

The image bytes are copied unchanged (or hard/symbolic linked) once checked to decode as an image;
two files that would give one output (``a.JPEG`` and ``a.jpeg``) are refused. The class index of a sample is the
position of its wnid in the sorted wnids (the torchvision ImageFolder convention), recorded as
``classes`` in ``multimae_data.json``.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from multimae.data.errors import DataError
from multimae.data.prepare.writing import Item, check_image_file

KNOWN = {"train": 1281167, "val": 50000}
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)$")
EXTS = (".jpeg", ".jpg", ".png")


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in EXTS and not p.name.startswith("."))


def _class_tree(d: Path) -> list[tuple[str, Path]]:
    classes = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(c.name, f) for c in classes for f in _images(c)]


def read_loc_solution(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> image id -> wnid."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns ImageId,PredictionString, got {list(rows[0]) if rows else []}")
    out = {}
    for line, r in enumerate(rows, start=2):
        tokens = (r["PredictionString"] or "").split()
        if not tokens or not re.fullmatch(r"n\d{8}", tokens[0]):
            raise DataError(f"{path} line {line}: PredictionString {r['PredictionString']!r} does not start "
                            "with a wnid (n01751748 x y x y ...)")
        out[r["ImageId"].strip()] = tokens[0]
    return out


def read_devkit(gt: Path, meta: Path | None) -> dict[str, str]:
    """``ILSVRC2012_validation_ground_truth.txt`` + devkit ``meta.mat`` -> image id -> wnid."""
    from multimae.data.prepare.matfiles import load_v5

    if meta is None:
        raise DataError(f"{gt}: the ILSVRC2012 ids need the devkit's meta.mat (--devkit-meta) to name the wnids")
    mat = load_v5(meta, "the ILSVRC2012 devkit meta.mat (synsets)", ("synsets",), squeeze_me=True)
    syn = mat["synsets"]
    names = getattr(getattr(syn, "dtype", None), "names", None) or ()
    missing = [k for k in ("ILSVRC2012_ID", "WNID", "num_children") if k not in names]
    if missing:
        raise DataError(f"{meta}: synsets has no field {missing[0]!r} (fields {list(names)})")
    id_to_wnid = {}
    for rec in syn.reshape(-1):
        i, children = int(rec["ILSVRC2012_ID"]), int(rec["num_children"])
        if 1 <= i <= 1000 and children == 0:
            id_to_wnid[i] = str(rec["WNID"])
    if len(id_to_wnid) != 1000:
        raise DataError(f"{meta}: {len(id_to_wnid)} leaf synsets with ILSVRC2012_ID 1..1000, expected 1000")
    try:
        lines = gt.read_text().split()
    except OSError as e:
        raise DataError(f"{gt}: unreadable ({e})") from None
    out = {}
    for n, tok in enumerate(lines, start=1):
        if not tok.isdigit() or int(tok) not in id_to_wnid:
            raise DataError(f"{gt} line {n}: {tok!r} is not an ILSVRC2012 id 1..1000")
        out[f"ILSVRC2012_val_{n:08d}"] = id_to_wnid[int(tok)]
    return out


def _words(meta: Path | None) -> dict[str, str]:
    if meta is None:
        return {}
    from multimae.data.prepare.matfiles import load_v5

    syn = load_v5(meta, "the ILSVRC2012 devkit meta.mat", ("synsets",), squeeze_me=True)["synsets"]
    if "words" not in (syn.dtype.names or ()):
        return {}
    return {str(r["WNID"]): str(r["words"]) for r in syn.reshape(-1)}


def _interleave(pairs: list[tuple[str, Path]], limit: int | None) -> list[tuple[str, Path]]:
    """All pairs (sorted), or a ``limit``-sized subset taking classes in turn (covers many classes)."""
    if limit is None:
        return pairs
    by: dict[str, list[Path]] = {}
    for c, p in pairs:
        by.setdefault(c, []).append(p)
    out, k = [], 0
    while len(out) < limit and any(k < len(v) for v in by.values()):
        out += [(c, v[k]) for c, v in sorted(by.items()) if k < len(v)]
        k += 1
    return sorted(out[:limit])


def items(src: Path, val_labels: Path | None = None, devkit_meta: Path | None = None,
          limit: int | None = None) -> tuple[list[Item], dict, list[str]]:
    src = Path(src)
    tdir, vdir = src / "train", src / "val"
    for d in (tdir, vdir):
        if not d.is_dir():
            raise DataError(f"{d}: not found (expected {src}/train/<wnid>/*.JPEG and {src}/val/)")
    train = _class_tree(tdir)
    if not train:
        raise DataError(f"{tdir}: no images under wnid directories (train/<wnid>/*.JPEG)")
    wnids = sorted({c for c, _ in train})
    flat = _images(vdir)
    if flat:
        if val_labels is None:
            raise DataError(f"{vdir}: flat validation images need --val-labels (LOC_val_solution.csv, or "
                            "ILSVRC2012_validation_ground_truth.txt with --devkit-meta meta.mat)")
        val_labels = Path(val_labels)
        if not val_labels.is_file():
            raise DataError(f"{val_labels}: not found")
        labels = read_loc_solution(val_labels) if val_labels.suffix.lower() == ".csv" else \
            read_devkit(val_labels, Path(devkit_meta) if devkit_meta else None)
        val = []
        for f in flat:
            if f.stem not in labels:
                raise DataError(f"{val_labels}: no label for validation image {f}")
            val.append((labels[f.stem], f))
    else:
        val = _class_tree(vdir)
        if not val:
            raise DataError(f"{vdir}: no validation images (flat, or in wnid directories)")
    unknown = sorted({c for c, _ in val} - set(wnids))
    if unknown:
        raise DataError(f"{vdir}: validation classes {unknown[:3]} have no train/<wnid>/ directory")
    out: list[Item] = []
    index = {w: i for i, w in enumerate(wnids)}
    for split, pairs in (("train", train), ("val", val)):
        for c, f in _interleave(pairs, limit):
            out.append(Item(split, c, f.stem, {"rgb": f.suffix[1:].lower()},
                            lambda f=f: {"rgb": check_image_file(f, "imagenet")}, str(f), index[c]))
    words = _words(Path(devkit_meta)) if devkit_meta else {}
    facts = {"source": {"src": str(src), "val_labels": str(val_labels) if val_labels else None},
             "classification": {"num_classes": len(wnids), "class_index": "sorted wnids (torchvision ImageFolder)",
                                "names": [words.get(w, w) for w in wnids]}}
    return out, facts, wnids
