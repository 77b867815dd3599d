"""COCO captions -> the image-caption data M3AE pretraining reads (``data.source=captions`` or
``data.source=shards``).

Input: the image directory (``train2017/``) and ``captions_train2017.json``
(``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", "id"}]}``,
about 5 captions per image).

The ``file_name`` s must be paths inside the image directory (absolute paths, ``..`` and symbolic
links leading out are refused) of files that decode as images (checked before they are copied);
an image in a subfolder is named after its path (``sub/a.jpg`` -> ``sub__a.jpg``), so that
same-named files of different folders stay two images.

Folder output: the images (bytes unchanged, or linked) under ``root/<split>/rgb/all/<name>.jpg`` (the
folder layout, e.g. for ``multimae pseudolabel``) and the
caption table ``root/captions_<split>.tsv`` (``data.root`` of ``data.source=captions``):

* ``--per-sample caption``: columns ``image, caption``, one row (sample) per caption;
* ``--per-sample image``: columns ``image, captions``, one row per image, its captions as a JSON
  list; :class:`~multimae.data.text.CaptionTable` draws one of them per epoch (seeded).

Shard output (``--per-sample caption`` only): ``root/<split>-%06d.tar`` of ``rgb.jpg`` +
``caption.txt`` samples (``data.source=shards``; each image is stored once per caption).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePosixPath

from multimae.data.errors import DataError
from multimae.data.codecs import IMAGE_EXTS
from multimae.data.prepare.writing import Item, check_image_file, contained

KNOWN_IMAGES = {"train": 118287, "val": 5000}
KNOWN_CAPTIONS = {"train": 591753, "val": 25014}


def clean(caption: str) -> str:
    """One line of text: internal newlines / tabs / runs of spaces become one space."""
    return " ".join(caption.split())


def read_captions(path: Path) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """``(image id, file name, [(annotation id, caption), ...])`` sorted by file name; images
    without captions are left out."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected captions_<split>2017.json)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict) or "images" not in obj or "annotations" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a COCO captions file with 'images' and 'annotations', got {keys}")
    files = {}
    for i, im in enumerate(obj["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] lacks 'id' / a 'file_name' string")
        files[im["id"]] = im["file_name"]
    caps: dict[int, list[tuple[int, str]]] = {}
    for i, a in enumerate(obj["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] lacks 'image_id' / a 'caption' string "
                            "(an instances_*.json given for captions_*.json?)")
        if a["image_id"] not in files:
            raise DataError(f"{path}: annotations[{i}] names image_id {a['image_id']} not in 'images'")
        text = clean(a["caption"])
        if text:
            caps.setdefault(a["image_id"], []).append((int(a.get("id", i)), text))
    return sorted(((i, files[i], sorted(c)) for i, c in caps.items()), key=lambda r: r[1])


def output_name(name: str) -> str:
    """The output sample name of a relative image path: its stem, prefixed by its folders joined
    with ``__`` (``sub1/dup.jpg`` -> ``sub1__dup``), so images in different folders stay apart."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return "__".join([*parts[:-1], PurePosixPath(parts[-1]).stem])


def items(images: Path, captions: Path, split: str, per_sample: str = "caption", fmt: str = "folder",
          limit: int | None = None) -> tuple[list[Item], list[tuple[str, list[str]]], dict]:
    """Output items (images to write), the caption table rows ``(image path, captions)``, facts.
    ``limit``: at most this many images."""
    if per_sample not in ("caption", "image"):
        raise ValueError(f"per_sample must be caption or image, got {per_sample!r}")
    if fmt == "shards" and per_sample == "image":
        raise DataError("--per-sample image is written as a caption table (--format folder); shards hold one "
                        "caption per sample (--per-sample caption)")
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: image directory not found (e.g. train2017/)")
    recs = read_captions(captions)
    if limit is not None:
        recs = recs[:limit]
    out: list[Item] = []
    rows: list[tuple[str, list[str]]] = []
    for image_id, name, caps in recs:
        where = f"{captions}: image {image_id}"
        src = contained(images, name, where)
        if not src.is_file():
            raise DataError(f"{src}: image {image_id} of {captions} not found")
        stem, ext = output_name(name), Path(name).suffix[1:].lower()
        if ext not in IMAGE_EXTS:
            raise DataError(f"{where}: {name!r} is not an image file name (.{' .'.join(IMAGE_EXTS)})")
        if fmt == "folder":
            out.append(Item(split, "all", stem, {"rgb": ext},
                            lambda src=src, w=where: {"rgb": check_image_file(src, w)}, str(src)))
            rows.append((f"{split}/rgb/all/{stem}.{ext}", [c for _, c in caps]))
        else:
            for ann_id, cap in caps:
                out.append(Item(split, "all", f"{stem}_{ann_id}", {"rgb": ext, "caption": "txt"},
                                lambda src=src, cap=cap, w=where: {"rgb": check_image_file(src, w),
                                                                   "caption": cap.encode()}, str(src)))
    facts = {"source": {"images": str(images), "captions": str(captions)}, "per_sample": per_sample,
             "images": len(recs), "captions": sum(len(c) for _, _, c in recs)}
    return out, rows, facts


def table_bytes(rows: list[tuple[str, list[str]]], per_sample: str) -> bytes:
    """The caption table (TSV with a header) of the folder output."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    if per_sample == "caption":
        w.writerows([["image", "caption"], *([image, c] for image, caps in rows for c in caps)])
    else:
        w.writerows([["image", "captions"], *([image, json.dumps(caps, ensure_ascii=False)] for image, caps in rows)])
    return buf.getvalue().encode("utf-8")
