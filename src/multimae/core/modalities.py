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

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

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
        bands: a multi-band raster's bands to keep, in order, by 0-based index or by name
            (names from ``band_names`` or the file's own band descriptions); empty: every band.
            ``channels`` must equal the number kept. Setting ``bands``, ``band_names`` or
            ``nodata`` makes a ``dense`` modality a *raster*: its ``.tif`` / ``.tiff`` / ``.npy``
            files are read through tifffile with their raw values (:mod:`multimae.data.rasters`).
        band_names: the names of the file's bands in file order (to select ``bands`` by name).
        nodata: the raw value that marks an invalid pixel (in any kept band); such pixels are
            excluded from the statistics, zero after normalisation, and a patch with no valid
            pixel is padding (never visible, never in the loss).
        unit_vectors: the channels form a unit vector per pixel (surface normals): a dense head
            predicting it is scored by angular error.
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
    bands: tuple[int | str, ...] = ()
    band_names: tuple[str, ...] = ()
    nodata: float | None = None
    unit_vectors: bool = False

    def __post_init__(self) -> None:
        for k in ("mean", "std", "hflip_negate", "bands", "band_names"):  # YAML / JSON lists -> tuples
            v = getattr(self, k)
            if isinstance(v, list):
                object.__setattr__(self, k, tuple(v))
        if self.kind not in ("image", "dense", "categorical", "text"):
            raise ValueError(f"modality {self.name!r}: unknown kind {self.kind!r}")
        if self.kind in ("categorical", "text") and self.num_classes <= 0:
            raise ValueError(f"modality {self.name!r}: kind {self.kind!r} needs num_classes > 0")
        if self.kind in ("image", "dense") and self.channels <= 0:
            raise ValueError(f"modality {self.name!r}: channels must be positive")
        if self.stride < 1:
            raise ValueError(f"modality {self.name!r}: stride must be >= 1, got {self.stride}")
        self._check_norm()
        if self.is_raster:
            self._check_raster()

    def _check_norm(self) -> None:
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is None:
                continue
            if self.kind in ("image", "dense") and len(v) not in (1, self.channels):
                raise ValueError(f"modality {self.name!r}: {key} has {len(v)} values for {self.channels} channels")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise ValueError(f"modality {self.name!r}: {key} must be finite numbers, got {list(v)}")
        if self.std is not None and any(x <= 0 for x in self.std):
            raise ValueError(f"modality {self.name!r}: std must be positive, got {list(self.std)}")

    def _check_raster(self) -> None:
        if self.kind != "dense":
            raise ValueError(f"modality {self.name!r}: bands / band_names / nodata need kind 'dense' "
                             f"(a raster), got {self.kind!r}")
        if self.nodata is not None and (isinstance(self.nodata, bool) or not isinstance(self.nodata, (int, float))):
            raise ValueError(f"modality {self.name!r}: nodata must be a number or null, got {self.nodata!r}")
        for b in self.bands:
            if isinstance(b, bool) or not isinstance(b, (int, str)) or (isinstance(b, int) and b < 0):
                raise ValueError(f"modality {self.name!r}: bands must be 0-based indices or names, got {b!r}")
            if isinstance(b, str) and self.band_names and b not in self.band_names:
                raise ValueError(f"modality {self.name!r}: band {b!r} is not in band_names {list(self.band_names)}")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"modality {self.name!r}: bands repeats a band: {list(self.bands)}")
        if self.bands and len(self.bands) != self.channels:
            raise ValueError(f"modality {self.name!r}: bands keeps {len(self.bands)} band(s) "
                             f"{list(self.bands)} but channels={self.channels}")
        if self.band_names and not self.bands and len(self.band_names) != self.channels:
            raise ValueError(f"modality {self.name!r}: band_names has {len(self.band_names)} names "
                             f"but channels={self.channels} (set bands to keep a subset)")

    @property
    def is_raster(self) -> bool:
        """A multi-band raster (``bands``, ``band_names`` or ``nodata`` set): raw values from
        tifffile / numpy, per-band ``mean`` / ``std`` from ``multimae data stats``."""
        return self.kind == "dense" and bool(self.bands or self.band_names or self.nodata is not None)

    @property
    def normalized(self) -> bool:
        """Whether the data transforms apply ``(x - mean) / std`` to this modality."""
        return self.mean is not None and self.kind in ("image", "dense")

    def norm_tensors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as (C,1,1) tensors (``std`` defaults to 1); (0, 1) when unset."""
        c = self.channels
        mean = torch.tensor(self.mean if self.mean is not None else (0.0,), dtype=dtype)
        std = torch.tensor(self.std if self.std is not None else (1.0,), dtype=dtype)
        return mean.expand(c).reshape(c, 1, 1).clone(), std.expand(c).reshape(c, 1, 1).clone()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel of (..., C, H, W) values in the modality's units (an
        ``image`` in [0, 1]); unchanged without ``mean``. The one normalisation every path uses."""
        if not self.normalized:
            return x
        mean, std = self.norm_tensors(x.dtype if x.is_floating_point() else torch.float32)
        return (x - mean.to(x.device)) / std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: model-space values back to the modality's units."""
        if not self.normalized:
            return x
        mean, std = self.norm_tensors(x.dtype if x.is_floating_point() else torch.float32)
        return x * std.to(x.device) + mean.to(x.device)

    def norm_affine(self, input_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) float32 (C,1,1) with ``x * scale + shift == normalize(x * input_scale)``
        (computed in float64; e.g. ``input_scale = 1/255`` for uint8 pixels), None without ``mean``."""
        if not self.normalized:
            return None
        mean, std = self.norm_tensors(torch.float64)
        return (input_scale / std).float(), (-mean / std).float()

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
        return cls(**d)  # lists become tuples in __post_init__


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
            name = it.get("name")
            if name is None:
                raise ValueError(f"modality entry {it!r} has no 'name'")
            spec = get(name).with_(**{k: v for k, v in it.items() if k != "name"}) if name in _REGISTRY \
                else ModalitySpec.from_dict(it)
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
NORMALS = register(ModalitySpec("normals", "dense", channels=3, loss="l1", hflip_negate=(0,), unit_vectors=True))
# Text (M3AE): BERT uncased vocabulary by default; the synthetic scenes train their own.
CAPTION = register(ModalitySpec("caption", "text", num_classes=30522, loss="ce", max_len=64))
