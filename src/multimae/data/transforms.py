"""Paired transforms: one crop and one flip shared by every modality of a sample.

A raw sample (see ``multimae.data``) becomes a model-ready sample, per modality kind:

* ``image``: float32 (C,S,S), bilinear, normalised with ``spec.mean`` / ``spec.std``.
* ``dense``: float32 (C,S,S), bilinear over valid pixels only; ``spec.standardize == "robust"``
  applies the truncated standardisation of :func:`robust_standardize`; invalid pixels are 0.
  Channels listed in ``spec.hflip_negate`` change sign when the sample is flipped (normals x).
* ``categorical``: int64 (S/stride, S/stride), nearest (half-pixel centres, so the class grid
  stays registered with the bilinear images).
* ``text``: the string, unchanged (tokenised elsewhere).

Randomness comes only from a ``torch.Generator``: the one passed to ``__call__``; else, with an
integer ``seed``, one derived from ``(seed, epoch, sample key)`` (reproducible, independent of
workers; call ``set_epoch`` every epoch); else (``seed=None``, the default) a per-process generator
seeded from ``torch.initial_seed()``, which DataLoader sets differently in every worker and epoch.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from multimae.data.errors import DataError
from multimae.data.fields import by_key
from multimae.modalities import ModalitySpec, resolve
from multimae.seeding import derive_seed

Box = tuple[int, int, int, int]  # top, left, height, width


def robust_standardize(depth: Tensor, valid: Tensor | None = None, trunc: float = 0.1) -> Tensor:
    """Truncated standardisation of one sample (any shape, e.g. (1,H,W)).

    Statistics use the valid values only (default: finite and non-zero): sorted, the values
    ``[int(trunc*n) : int((1-trunc)*n)]`` are kept, and the output is
    ``(depth - mean) / sqrt(var_unbiased + 1e-6)`` of those, with invalid pixels set to 0.
    A sample without valid pixels becomes all zeros.
    """
    x = depth.float()
    if valid is None:
        valid = torch.isfinite(x) & (x != 0)
    vals = x[valid]
    n = vals.numel()
    if n == 0:
        return torch.zeros_like(x)
    s = vals.sort().values
    kept = s[int(trunc * n): int((1 - trunc) * n)]
    if kept.numel() < 2:
        kept = s
    var = kept.var() if kept.numel() > 1 else kept.new_zeros(())
    out = (x - kept.mean()) / torch.sqrt(var + 1e-6)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype))


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator | None) -> Box:
    """A RandomResizedCrop box (top, left, h, w) drawn with ``generator``.

    Same distribution as ``torchvision``'s RandomResizedCrop: area fraction uniform in ``scale``,
    aspect ratio log-uniform in ``ratio``, ten tries, then a centre crop clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, crop_pct: float = 1.0) -> Box:
    """The centred square box: resizing it to S equals resize-shorter-side-to-S + centre crop;
    ``crop_pct`` < 1 keeps that fraction of the shorter side (resize to S / crop_pct, crop S)."""
    side = max(1, int(round(min(height, width) * crop_pct)))
    return (height - side) // 2, (width - side) // 2, side, side


def _resize_image(x: Tensor, box: Box, size: int, spec: ModalitySpec) -> Tensor:
    out = TF.resized_crop(x, *box, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    out = out.float() / 255.0 if not out.is_floating_point() else out.float()
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, dtype=out.dtype).view(-1, 1, 1)
        std = torch.tensor(spec.std if spec.std is not None else (1.0,), dtype=out.dtype).view(-1, 1, 1)
        out = (out - mean) / std
    return out


def _dense_valid(x: Tensor, spec: ModalitySpec) -> Tensor:
    """Valid pixels (1,H,W): finite in every channel and, for robust-standardised data, non-zero."""
    valid = torch.isfinite(x).all(0, keepdim=True)
    if spec.standardize == "robust":
        valid &= (x != 0).any(0, keepdim=True)
    return valid


def _resize_dense(x: Tensor, box: Box, size: int, spec: ModalitySpec) -> tuple[Tensor, Tensor]:
    """Bilinear crop-resize that ignores invalid pixels; returns values (C,S,S) and validity (1,S,S)."""
    x = x.float()
    valid = _dense_valid(x, spec)
    kw = dict(interpolation=InterpolationMode.BILINEAR, antialias=True)
    if bool(valid.all()):
        out = TF.resized_crop(x, *box, [size, size], **kw)
        return out, torch.ones((1, size, size), dtype=torch.bool)
    num = TF.resized_crop(torch.where(valid, x, torch.zeros(())), *box, [size, size], **kw)
    den = TF.resized_crop(valid.float(), *box, [size, size], **kw)
    ok = den >= 0.5  # at least half of the interpolation weight fell on valid pixels
    return torch.where(ok, num / den.clamp_min(1e-6), torch.zeros(())), ok


def _resize_categorical(x: Tensor, box: Box, size: int) -> Tensor:
    out = TF.resized_crop(x[None], *box, [size, size], interpolation=InterpolationMode.NEAREST_EXACT)
    return out[0]


class PairedTransform:
    """Crop, flip and normalise every modality of a raw sample in the same way.

    Args:
        specs: modalities to produce (specs, registered names, or dicts). Output-only specs
            (``input=False``) read a key another spec already produces and are not repeated.
        image_size: output side S of the spatial modalities at stride 1.
        train: RandomResizedCrop + horizontal flip; else resize shorter side + centre crop.
        scale, ratio: RandomResizedCrop area fraction and aspect ratio ranges.
        hflip: probability of a horizontal flip (train only).
        seed: None (default): draw from a generator seeded once per process from
            ``torch.initial_seed()`` (DataLoader gives each worker its own seed, renewed every
            epoch; persistent workers keep advancing theirs). An int: every sample gets a generator
            seeded with ``derive_seed(seed, epoch, sample["__key__"])``, reproducible whatever the
            worker layout; then call :meth:`set_epoch` every epoch (ShardDataset does it), and note
            that persistent DataLoader workers never see that call.
        trunc: fraction dropped at each end by the robust standardisation.
        eval_crop_pct: evaluation centre crop keeps this fraction of the shorter side.
        train_crop: ``"random_resized"`` (RandomResizedCrop with ``scale`` / ``ratio``) or
            ``"shorter_side"`` (a random square as large as the shorter side: resize + RandomCrop).

    ``__call__(sample, generator=None)`` returns the batch keys ``spec.key`` of the specs plus
    ``label``, ``__key__`` and any other string fields; other tensors are dropped.
    """

    def __init__(self, specs: Sequence[ModalitySpec | str | dict], image_size: int, train: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, seed: int | None = None, trunc: float = 0.1, eval_crop_pct: float = 1.0,
                 train_crop: str = "random_resized") -> None:
        self.specs = by_key(resolve(list(specs)))
        for spec in self.specs.values():
            if spec.is_spatial and image_size % spec.stride:
                raise ValueError(f"image_size {image_size} is not divisible by {spec.name!r} stride {spec.stride}")
        self.image_size, self.train = image_size, train
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.seed, self.epoch, self.trunc = seed, 0, trunc
        self.eval_crop_pct = float(eval_crop_pct)
        if train_crop not in ("random_resized", "shorter_side"):
            raise ValueError(f"train_crop={train_crop!r}: expected 'random_resized' or 'shorter_side'")
        self.train_crop = train_crop
        self._process_gen: tuple[int, torch.Generator] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process_gen": None}  # a copy in another process starts its own stream

    def set_epoch(self, epoch: int) -> None:
        """Change the per-sample augmentation stream (call once per epoch)."""
        self.epoch = epoch

    def __repr__(self) -> str:
        return (f"PairedTransform(keys={list(self.specs)}, image_size={self.image_size}, train={self.train}, "
                f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})")

    def _generator(self, sample: dict) -> torch.Generator:
        key = sample.get("__key__")
        if self.seed is not None and key is not None:
            return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, key))
        pid = os.getpid()
        if self._process_gen is None or self._process_gen[0] != pid:  # new process: fresh stream
            seed = derive_seed(torch.initial_seed(), "paired-transform")
            self._process_gen = (pid, torch.Generator().manual_seed(seed))
        return self._process_gen[1]

    def params(self, height: int, width: int, generator: torch.Generator | None) -> tuple[Box, bool]:
        """The crop box and flip decision for an input of size (height, width)."""
        if not self.train:
            return center_crop_box(height, width, self.eval_crop_pct), False
        if self.train_crop == "shorter_side":  # resize the shorter side to S, random S x S crop
            side = min(height, width)
            top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            box = (top, left, side, side)
        else:
            box = random_resized_crop_box(height, width, self.scale, self.ratio, generator)
        flip = self.hflip > 0 and float(torch.rand(1, generator=generator)) < self.hflip
        return box, flip

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        where = f"sample {sample.get('__key__', '?')}"
        box, flip = (0, 0, 0, 0), False
        if any(s.is_spatial for s in self.specs.values()):
            height, width = spatial_size(sample, list(self.specs.values()), where)
            box, flip = self.params(height, width, generator or self._generator(sample))
        out: dict = {}
        for key, spec in self.specs.items():
            if key not in sample:
                raise DataError(f"{where}: missing modality {key!r} (has {sorted(sample)})")
            out[key] = self._apply(sample[key], spec, box, flip, where)
        for key, value in sample.items():
            if key not in out and (isinstance(value, str) or (torch.is_tensor(value) and value.ndim == 0)):
                out[key] = value
        return out

    def _apply(self, x: object, spec: ModalitySpec, box: Box, flip: bool, where: str) -> object:
        if spec.kind == "text":
            if not isinstance(x, str):
                raise DataError(f"{where}: {spec.key!r} should be a str, got {type(x).__name__}")
            return x
        assert isinstance(x, Tensor)
        if spec.kind == "categorical":
            out = _resize_categorical(x, box, self.image_size // spec.stride)
            return out.flip(-1) if flip else out
        size = self.image_size // spec.stride
        if spec.kind == "image":
            out = _resize_image(x, box, size, spec)
            return out.flip(-1) if flip else out
        out, valid = _resize_dense(x, box, size, spec)
        if flip:
            out, valid = out.flip(-1), valid.flip(-1)
            for c in spec.hflip_negate:
                out[c] = -out[c]
        if spec.standardize == "robust":
            return robust_standardize(out, valid.expand_as(out), self.trunc)
        return torch.where(valid, out, torch.zeros(()))


def spatial_size(sample: dict, specs: Sequence[ModalitySpec], where: str) -> tuple[int, int]:
    """The common (H, W) of a sample's spatial modalities; DataError if they differ."""
    sizes = {s.key: tuple(sample[s.key].shape[-2:]) for s in specs
             if s.is_spatial and torch.is_tensor(sample.get(s.key))}
    if not sizes:
        raise DataError(f"{where}: no spatial modality among {[s.key for s in specs]} (has {sorted(sample)})")
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{k} {h}x{w}" for k, (h, w) in sizes.items())
        raise DataError(f"{where}: modalities have different sizes ({desc})")
    return next(iter(sizes.values()))  # type: ignore[return-value]
