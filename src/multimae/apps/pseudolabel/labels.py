"""Label sets of segmentation labellers: the COCO panoptic 133-class table and mapping onto it.

The table lives beside this module as data (``coco_panoptic_133.tsv``): one row per category with
its index (the class id ``multimae pseudolabel`` writes, 0..132, the order Mask2Former / OneFormer
COCO-panoptic models use: 80 things then 53 stuff classes), the COCO category id (1..200, with
gaps), the name and whether it is a thing. A model's own label ids are mapped onto it by name, so
a model whose ``id2label`` is keyed by COCO category ids (DETR style) or ordered differently still
produces the same 133 ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Mapping, Sequence

import torch
from torch import Tensor

COCO_PANOPTIC = "coco-panoptic-133"


@dataclass(frozen=True)
class Category:
    index: int
    coco_id: int
    name: str
    isthing: bool


@lru_cache(maxsize=1)
def coco_panoptic_categories() -> tuple[Category, ...]:
    """The 133 COCO panoptic categories (80 things, then 53 stuff), in class-id order."""
    text = resources.files("multimae.apps.pseudolabel").joinpath("coco_panoptic_133.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    header, body = rows[0], rows[1:]
    if header != ["index", "coco_id", "name", "isthing"]:
        raise RuntimeError(f"coco_panoptic_133.tsv: unexpected header {header}")
    cats = tuple(Category(int(i), int(c), n, t == "1") for i, c, n, t in body)
    if [c.index for c in cats] != list(range(133)):
        raise RuntimeError("coco_panoptic_133.tsv: indices must be 0..132 in order")
    return cats


def coco_panoptic_names() -> list[str]:
    return [c.name for c in coco_panoptic_categories()]


def normalize_name(name: str) -> str:
    """Case, '-', '_' and spaces do not matter when matching label names ("door-stuff" = "door stuff")."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@dataclass
class LabelMap:
    """How a model's label ids become the ids written to disk.

    lut: int64 (max model id + 1,) lookup table: model id -> written id (-1: the model id is unknown).
    names: the written label set, ``names[i]`` naming id ``i``.
    label_set: ``"coco-panoptic-133"`` or ``"own"`` (the model's labels, renumbered 0..K-1 in id order).
    """

    lut: Tensor
    names: list[str]
    label_set: str

    def __call__(self, ids: Tensor) -> Tensor:
        """Model label ids (any shape, int) -> written ids (int64, same shape)."""
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.lut.numel()):
            raise ValueError(f"label id outside the model's id2label range [0, {self.lut.numel()})")
        out = self.lut.to(ids.device)[ids]
        if ids.numel() and int(out.min()) < 0:
            raise ValueError(f"label id {int(ids[out < 0][0])} has no entry in the label map")
        return out


def build_label_map(id2label: Mapping[int | str, str], label_set: str = "auto") -> LabelMap:
    """Map a model's ``id2label`` onto COCO-panoptic-133 ids (by name) or onto its own label set.

    label_set: ``"coco"`` (every name must be a COCO panoptic category, else ValueError naming the
    unknown ones), ``"own"`` (the model's labels in id order), or ``"auto"`` (coco when every name
    matches, else own).
    """
    if label_set not in ("auto", "coco", "own"):
        raise ValueError(f"label set must be 'auto', 'coco' or 'own', got {label_set!r}")
    items = sorted((int(k), str(v)) for k, v in id2label.items())
    if not items:
        raise ValueError("the model has an empty id2label; cannot name its classes")
    size = items[-1][0] + 1
    coco = {normalize_name(n): i for i, n in enumerate(coco_panoptic_names())}
    unknown = [n for _, n in items if normalize_name(n) not in coco]
    if label_set == "coco" and unknown:
        raise ValueError(f"{len(unknown)} label(s) of the model are not COCO panoptic categories: {unknown[:8]}")
    lut = torch.full((size,), -1, dtype=torch.int64)
    if label_set == "coco" or (label_set == "auto" and not unknown):
        for k, n in items:
            lut[k] = coco[normalize_name(n)]
        return LabelMap(lut, coco_panoptic_names(), COCO_PANOPTIC)
    for j, (k, _) in enumerate(items):
        lut[k] = j
    return LabelMap(lut, [n for _, n in items], "own")


def panoptic_to_semantic(segmentation: Tensor, segments_info: Sequence[Mapping], label_map: LabelMap,
                         fill: Tensor | int) -> Tensor:
    """A panoptic result -> a class-id map.

    segmentation: int (H,W) segment ids (as from ``post_process_panoptic_segmentation``);
    segments_info: ``[{"id": segment id, "label_id": model label id, ...}]``;
    fill: class ids (int64 (H,W)) or one id for pixels in no listed segment (0 / -1 ids).
    Returns int64 (H,W) ids in ``label_map.names``.
    """
    out = fill.clone().long() if torch.is_tensor(fill) else torch.full(segmentation.shape, int(fill), dtype=torch.int64)
    if tuple(out.shape) != tuple(segmentation.shape):
        raise ValueError(f"fill has shape {tuple(out.shape)}, segmentation {tuple(segmentation.shape)}")
    for seg in segments_info:
        cls = label_map(torch.tensor([int(seg["label_id"])]))[0]
        out[segmentation == int(seg["id"])] = cls
    return out
