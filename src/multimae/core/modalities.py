"""Modality specifications: the one place that knows what a modality is.

A :class:`ModalitySpec` says how a modality is tokenised (input adapter), predicted (output
adapter) and scored (loss). Adding a modality -- surface normals, edges, curvature -- means
registering one spec; the model, trainer and CLI never branch on modality names.

Conventions for a batch (``dict[str, Tensor]``) after the data transforms:

* ``kind="image"`` / ``"dense"``: float ``(B, channels, H / stride, W / stride)``.
* ``kind="categorical"``: int64 class ids ``(B, H / stride, W / stride)``.
* ``kind="text"``: int64 token ids ``(B, L)``; its padding travels in the batch's
  ``pad[name]`` ``(B, L)`` bool (True = padding; :class:`multimae.core.batch.Batch`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

Kind = Literal["image", "dense", "categorical", "text"]
LossName = Literal["mse", "l1", "ce"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModalitySpec:
    """What a modality is.

    Attributes:
        name: key in the batch and in the model's adapter dicts.
        kind: ``image`` (continuous, normalised), ``dense`` (continuous per-pixel target such as
            depth or normals), ``categorical`` (per-pixel class ids) or ``text`` (token ids).
        channels: channels of the tensor (``image``/``dense``); ignored otherwise.
        num_classes: classes of a ``categorical`` modality, vocabulary size of ``text``.
        stride: the tensor's resolution is ``image_size / stride`` (semseg: 4); the patch of
            this modality is ``patch_size / stride`` so that every modality has the same grid.
        loss: ``mse``, ``l1`` or ``ce`` on masked tokens.
        norm_pix: standardise the target per patch before the loss (MAE's norm-pix).
        source: batch key the target (and input) is read from; defaults to ``name``. The
            official ``norm_rgb`` task reads ``rgb``.
        input: whether the modality can be fed to the encoder (``norm_rgb`` is output-only).
        class_emb_dim: learned class-embedding width of a categorical input adapter.
        mean / std: per-channel normalisation applied by the data transforms (``image``).
        max_len: maximum number of tokens for ``text``.
        standardize: ``robust`` = per-sample truncated standardisation in the data transforms
            (depth: drop the 10% lowest and highest valid values for the statistics).
        hflip_negate: channels whose sign flips when the image is mirrored horizontally
            (surface normals: the x component), so paired flips keep the values correct.
        ignore_index: a ``categorical`` target's "no label" id (e.g. 255), accepted by the
            readers besides ``[0, num_classes)``; None: none.
    """

    name: str
    kind: Kind
    channels: int = 1
    num_classes: int = 0
    stride: int = 1
    loss: LossName = "mse"
    norm_pix: bool = False
    source: str | None = None
    input: bool = True
    class_emb_dim: int = 64
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_len: int = 0
    standardize: Literal["none", "robust"] = "none"
    hflip_negate: tuple[int, ...] = ()
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "dense", "categorical", "text"):
            raise ValueError(f"modality {self.name!r}: unknown kind {self.kind!r}")
        if self.kind in ("categorical", "text") and self.num_classes <= 0:
            raise ValueError(f"modality {self.name!r}: kind {self.kind!r} needs num_classes > 0")
        if self.kind in ("image", "dense") and self.channels <= 0:
            raise ValueError(f"modality {self.name!r}: channels must be positive")
        if self.stride < 1:
            raise ValueError(f"modality {self.name!r}: stride must be >= 1, got {self.stride}")

    @property
    def key(self) -> str:
        """Batch key holding this modality's tensor."""
        return self.source or self.name

    @property
    def out_channels(self) -> int:
        """Values predicted per pixel: class logits for categorical, channels otherwise."""
        return self.num_classes if self.kind in ("categorical", "text") else self.channels

    @property
    def is_spatial(self) -> bool:
        return self.kind != "text"

    def patch(self, patch_size: int) -> int:
        """Patch side of this modality at its own resolution."""
        return max(1, patch_size // self.stride)

    def grid(self, shape: tuple[int, ...] | list[int], patch_size: int) -> tuple[int, int] | None:
        """(rows, cols) of the token grid of a tensor of this modality with ``shape`` (its last
        two dims are the spatial ones, at 1/stride); None for text (a sequence)."""
        if not self.is_spatial:
            return None
        p = self.patch(patch_size)
        return shape[-2] // p, shape[-1] // p

    def num_tokens(self, shape: tuple[int, ...] | list[int], patch_size: int) -> int:
        """Tokens of a batch tensor of this modality: (B, L) text -> L; grids -> rows * cols."""
        grid = self.grid(shape, patch_size)
        return int(shape[1]) if grid is None else grid[0] * grid[1]

    def with_(self, **changes: object) -> "ModalitySpec":
        """A copy with some fields changed (e.g. ``semseg.with_(num_classes=21)``)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModalitySpec":
        d = dict(d)
        for k in ("mean", "std", "hflip_negate"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


_REGISTRY: dict[str, ModalitySpec] = {}


def register(spec: ModalitySpec, *, overwrite: bool = False) -> ModalitySpec:
    """Add a modality to the registry (``overwrite=True`` to replace a built-in one)."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"modality {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModalitySpec:
    """The registered spec of ``name``; a clear error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown modality {name!r}; registered: {sorted(_REGISTRY)}. "
            "Register a ModalitySpec with multimae.core.modalities.register(...)"
        ) from None


def registered() -> dict[str, ModalitySpec]:
    return dict(_REGISTRY)


def resolve(items: "list[str | dict | ModalitySpec]", overrides: dict | None = None) -> list[ModalitySpec]:
    """Turn names, dicts (``{"name": "semseg", "num_classes": 21}``) or specs into specs.

    A dict naming a registered modality changes only the fields it gives.
    """
    out: list[ModalitySpec] = []
    for it in items:
        if isinstance(it, ModalitySpec):
            spec = it
        elif isinstance(it, str):
            spec = get(it)
        elif isinstance(it, dict):
            d = dict(it)
            name = d.get("name")
            if name is None:
                raise ValueError(f"modality entry {it!r} has no 'name'")
            spec = get(name).with_(**{k: v for k, v in d.items() if k != "name"}) if name in _REGISTRY \
                else ModalitySpec.from_dict(d)
        else:
            raise TypeError(f"cannot make a modality from {it!r}")
        if overrides and spec.name in overrides:
            spec = spec.with_(**overrides[spec.name])
        out.append(spec)
    return out


RGB = register(ModalitySpec("rgb", "image", channels=3, loss="mse", mean=IMAGENET_MEAN, std=IMAGENET_STD))
NORM_RGB = register(ModalitySpec("norm_rgb", "image", channels=3, loss="mse", norm_pix=True, source="rgb",
                                 input=False, mean=IMAGENET_MEAN, std=IMAGENET_STD))
DEPTH = register(ModalitySpec("depth", "dense", channels=1, loss="l1", standardize="robust"))
SEMSEG = register(ModalitySpec("semseg", "categorical", num_classes=133, stride=4, loss="ce"))
NORMALS = register(ModalitySpec("normals", "dense", channels=3, loss="l1", hflip_negate=(0,)))
# Text (M3AE): BERT uncased vocabulary by default; the synthetic scenes train their own.
CAPTION = register(ModalitySpec("caption", "text", num_classes=30522, loss="ce", max_len=64))
