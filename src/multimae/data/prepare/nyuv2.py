"""NYU Depth v2 (labeled subset) -> ``root/{train,test}/{rgb,depth,semseg}/all/<name>.png``.

Inputs (the official downloads):

* ``nyu_depth_v2_labeled.mat``: MATLAB v7.3 (HDF5). h5py reads MATLAB's column-major arrays with
  their dimensions reversed: ``images`` (N,3,W,H) uint8, ``depths`` (N,W,H) float metres,
  ``labels`` (N,W,H) 0 = unlabelled, 1..894 the raw NYU classes; they are transposed to
  (H,W,3) / (H,W), i.e. 480 x 640 upright images.
* ``splits.mat`` (v5): ``trainNdxs`` / ``testNdxs``, 1-based indices (795 / 654).
* ``classMapping40.mat`` (v5): ``mapClass`` (1 x 894, values 1..40) and maybe ``className``.

Outputs: rgb PNG, depth as 16-bit PNG in millimetres (``png_scale`` 0.001 in
``multimae_data.json``, 0 = invalid), semseg 8-bit PNG of the 40 classes ``0..39``
(``mapClass[l-1] - 1``) with 255 = unlabelled (ignored). ``<name>`` is the 1-based index in the
.mat, 4 digits (``0001``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from multimae.data.errors import DataError
from multimae.data.prepare.matfiles import load_v5, open_h5
from multimae.data.prepare.writing import METRIC_PNG_SCALE, Item, metric_depth_mm

KNOWN = {"train": 795, "test": 654}
NUM_RAW = 894
IGNORE = 255
MAT = "nyu_depth_v2_labeled.mat"


def read_splits(path: Path, n: int) -> dict[str, list[int]]:
    mat = load_v5(path, "splits.mat (trainNdxs, testNdxs)", ("trainNdxs", "testNdxs"))
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        idx = np.asarray(mat[key]).reshape(-1)
        if idx.size == 0 or not np.issubdtype(idx.dtype, np.number) or np.any(idx != np.rint(idx)):
            raise DataError(f"{path}: {key} must be a vector of 1-based integer indices, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.min() < 1 or idx.max() > n:
            raise DataError(f"{path}: {key} holds indices [{idx.min()}, {idx.max()}] outside 1..{n} "
                            f"(the {n} images of {MAT})")
        out[split] = sorted(set(idx.tolist()))
    both = set(out["train"]) & set(out["test"])
    if both:
        raise DataError(f"{path}: {len(both)} indices are in both trainNdxs and testNdxs (e.g. {min(both)})")
    return out


def _names(raw: object) -> list[str] | None:
    try:
        flat = np.asarray(raw, dtype=object).reshape(-1)
        names = [str(np.asarray(x).reshape(-1)[0]).strip() for x in flat]
    except (IndexError, ValueError, TypeError):
        return None
    return names if len(names) == 40 and all(names) else None


def read_mapping(path: Path) -> tuple[np.ndarray, list[str]]:
    """(lookup table raw id 0..894 -> 0..39 or 255, the 40 class names)."""
    mat = load_v5(path, "classMapping40.mat (mapClass)", ("mapClass",))
    m = np.asarray(mat["mapClass"]).reshape(-1)
    if m.size != NUM_RAW or np.any(m != np.rint(m)) or m.min() < 1 or m.max() > 40:
        raise DataError(f"{path}: mapClass must be {NUM_RAW} integers in 1..40, got {m.size} values in "
                        f"[{m.min()}, {m.max()}]")
    lut = np.full(NUM_RAW + 1, IGNORE, dtype=np.uint8)
    lut[1:] = m.astype(np.int64) - 1
    names = _names(mat["className"]) if "className" in mat else None
    return lut, names or [f"class_{i:02d}" for i in range(1, 41)]


def items(mat: Path, splits: Path, mapping: Path, limit: int | None = None) -> tuple[list[Item], dict, list[str]]:
    """The output items (train, then test), the metadata facts, and the class names."""
    f = open_h5(mat, MAT)
    where = f"{mat}"
    for key in ("images", "depths", "labels"):
        if key not in f:
            raise DataError(f"{where}: no {key!r} dataset (has {sorted(f.keys())}); expected {MAT}")
    images, depths, labels = f["images"], f["depths"], f["labels"]
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{where}: images has shape {images.shape}, expected (N,3,W,H) as h5py reads {MAT}")
    n, _, w, h = images.shape
    for key, ds in (("depths", depths), ("labels", labels)):
        if tuple(ds.shape) != (n, w, h):
            raise DataError(f"{where}: {key} has shape {tuple(ds.shape)}, expected {(n, w, h)} (images {images.shape})")
    split_idx = read_splits(splits, n)
    lut, names = read_mapping(mapping)

    def make(i: int) -> dict[str, bytes]:
        from multimae.data.codecs import encode_field, encode_png16
        import torch

        rgb = np.ascontiguousarray(images[i - 1].transpose(0, 2, 1))  # (3,W,H) -> (3,H,W)
        depth = np.asarray(depths[i - 1], dtype=np.float64).T
        raw = np.asarray(labels[i - 1]).T.astype(np.int64)
        if raw.min() < 0 or raw.max() > NUM_RAW:
            raise DataError(f"{where}: labels of image {i} hold ids [{raw.min()}, {raw.max()}] outside 0..{NUM_RAW}")
        return {"rgb": encode_field(torch.from_numpy(rgb), "rgb", "png")[1],
                "depth": encode_png16(metric_depth_mm(depth)),
                "semseg": encode_field(torch.from_numpy(lut[raw].astype(np.int64)), "semseg")[1]}

    out: list[Item] = []
    exts = {"rgb": "png", "depth": "png", "semseg": "png"}
    for split in ("train", "test"):
        chosen = split_idx[split] if limit is None else split_idx[split][:limit]
        out += [Item(split, "all", f"{i:04d}", exts, lambda i=i: make(i), f"{where} image {i}") for i in chosen]
    facts = {"source": {"mat": str(mat), "splits": str(splits), "mapping": str(mapping)},
             "semseg": {"num_classes": 40, "ignore_index": IGNORE, "classes": names,
                        "mapping": "raw 0 -> 255; raw l in 1..894 -> mapClass[l-1] - 1"},
             "depth": {"units": "metres", "png_scale": METRIC_PNG_SCALE, "invalid": 0}}
    return out, facts, names
