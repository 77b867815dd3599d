"""Paired transforms: one crop and one flip shared by every modality of a sample.

A raw sample (see ``multimae.data``) becomes a model-ready sample, per modality kind:

* ``image``: float32 (C,S,S), bilinear, normalised by ``spec.normalize`` (``mean`` / ``std``).
* ``dense``: float32 (C,S,S), bilinear over valid pixels only; ``spec.standardize == "robust"``
  applies the truncated standardisation of :func:`robust_standardize`; invalid pixels are 0.
  Channels listed in ``spec.hflip_negate`` change sign when the sample is flipped (normals x).
  With ``spec.mean`` (a raster's per-band statistics) the valid pixels are normalised by
  ``spec.normalize``; a raster (``spec.is_raster``) also yields ``valid_key(key)``: (1,S,S) bool,
  False at its nodata pixels.
* ``categorical``: int64 (S/stride, S/stride), nearest (half-pixel centres, so the class grid
  stays registered with the bilinear images).
* ``text``: the string, unchanged (tokenised elsewhere).

Randomness comes only from a ``torch.Generator``: the one passed to ``__call__``; else, with an
integer ``seed``, one derived from ``(seed, epoch, sample key)`` (reproducible, independent of
workers; call ``set_epoch`` every epoch); else (``seed=None``, the default) a per-process generator
seeded from ``torch.initial_seed()``, which DataLoader sets differently in every worker and epoch.

``PairedTransform(fast=True)`` (the training loader's default, ``data.fast_decode``) is the fast
path over :class:`~multimae.data.codecs.Packed` fields: the same boxes, flips and seeds, semseg
bit for bit the reference's, rgb within 1e-6 (a fused normalisation), depth within 1e-6 of the
reference algorithm computed in float64, which the float32 reference is up to ~1e-4 from (see
``tests/data/test_fast_path.py``).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from multimae.data.codecs import EncodedJpeg, Packed
from multimae.data.device_decode import DeferredImage
from multimae.data.resize import bilinear as _bilinear
from multimae.data.errors import DataError
from multimae.data.fields import by_key
from multimae.core.modalities import ModalitySpec, resolve
from multimae.core.seeding import derive_seed

Box = tuple[int, int, int, int]  # top, left, height, width


def valid_key(key: str) -> str:
    """The sample / batch field holding a raster's valid pixels (1,S,S) bool (nodata: False)."""
    return f"{key}.valid"


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


SELECT_SAMPLE = 1024  # values the cut thresholds of :func:`trimmed_moments` are estimated from


def _sum2(x: np.ndarray, pivot: float) -> tuple[float, float]:
    """(sum, sum of squares) of ``x - pivot`` in float64 (einsum: no BLAS threads, which spin on a
    busy core)."""
    d = x.astype(np.float64)
    d -= pivot
    return float(d.sum()), float(np.einsum("i,i->", d, d))


def trimmed_moments(values: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """Mean and unbiased variance of the values of ranks ``[lo, hi)`` of ``values`` (1-D), i.e. of
    ``np.sort(values)[lo:hi]``, without sorting or partitioning all of them; summed in float64.

    Two thresholds read from a sorted strided sample of :data:`SELECT_SAMPLE` values, ~4 standard
    errors of the sample's ranks outside the cuts, split the values into those below (a few more
    than ``lo``), the middle (all kept) and those above (a few more than ``n - hi``); only the two
    small outer sets are partitioned, to take their kept part. When a threshold falls short (ties,
    an odd sample) the full partition is used (:func:`trimmed_moments_partition`). The kept multiset
    is the sort's, so the only difference to summing that slice is float64 rounding (sums around a
    pivot, the sample's median). ~2x faster than ``np.partition`` at the two cut ranks on 224 px maps."""
    n = values.size
    if not 0 <= lo < hi <= n:
        raise ValueError(f"trimmed_moments: ranks [{lo}, {hi}) of {n} values")
    if n < 4 * SELECT_SAMPLE:  # small maps: the partition costs little
        return trimmed_moments_partition(values, lo, hi)
    sample = np.sort(values[::n // SELECT_SAMPLE])
    m, c = sample.size, n - hi
    margin = 2 * int(math.sqrt(m)) + 8  # a sample rank's standard error is <= sqrt(m) / 2: ~4 of them
    a, b = sample[min(m - 1, lo * m // n + margin)], sample[max(0, hi * m // n - margin)]
    if lo > 0 and c > 0 and not a <= b:
        return trimmed_moments_partition(values, lo, hi)
    outer, below, above = None, values[:0], values[:0]  # below / above: empty where nothing is cut
    if lo > 0:
        outer = values < a
        below = values[outer]
    if c > 0:
        high = values > b
        above = values[high]
        outer = high if outer is None else outer | high
    nb, na = below.size, above.size
    if nb < lo or na < c or nb > hi or na > n - lo:  # a threshold fell short: ties or an odd sample
        return trimmed_moments_partition(values, lo, hi)
    pivot = float(sample[m // 2])
    t1, t2 = _sum2(values if outer is None else values[~outer], pivot)  # below < a <= middle <= b < above
    if lo < nb:
        s = _sum2(np.partition(below, lo)[lo:], pivot)
        t1, t2 = t1 + s[0], t2 + s[1]
    if na > c:
        s = _sum2(np.partition(above, na - c - 1)[:na - c], pivot)
        t1, t2 = t1 + s[0], t2 + s[1]
    k = hi - lo
    return pivot + t1 / k, (max(t2 - t1 * t1 / k, 0.0) / (k - 1) if k > 1 else 0.0)


def trimmed_moments_partition(values: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """:func:`trimmed_moments` by ``np.partition`` at the two cut ranks (its fallback)."""
    kept = np.partition(values, (lo, hi - 1))[lo:hi].astype(np.float64)
    mean = float(kept.mean())
    kept -= mean
    return mean, (float(np.einsum("i,i->", kept, kept)) / (kept.size - 1) if kept.size > 1 else 0.0)


def _truncated_moments(vals: Tensor, trunc: float) -> tuple[float, float]:
    """:func:`trimmed_moments` of (1-D) ``vals`` without the fraction ``trunc`` at each end (all of
    them when fewer than 2 would be kept)."""
    n = vals.numel()
    lo, hi = int(trunc * n), int((1 - trunc) * n)
    return trimmed_moments(vals.detach().cpu().numpy(), *((0, n) if hi - lo < 2 else (lo, hi)))


def robust_standardize_fast(depth: Tensor, valid: Tensor | None = None, trunc: float = 0.1,
                            all_valid: bool = False) -> Tensor:
    """:func:`robust_standardize` with the truncated statistics of :func:`trimmed_moments`
    (no sort: the same kept multiset, summed in float64; the reference sums the sorted values in
    float32), so the output matches :func:`robust_standardize` to about 1e-6 (tested in
    ``tests/data/test_fast_path.py``).
    ``all_valid``: every pixel is valid (what ``valid`` all True means, without building it).
    """
    x = depth.float()
    if valid is None and not all_valid:
        valid = torch.isfinite(x) & (x != 0)
    every = all_valid or bool(valid.all())
    vals = x.reshape(-1) if every else x[valid]
    if vals.numel() == 0:
        return torch.zeros_like(x)
    mean, var = _truncated_moments(vals, trunc)
    mean32, var32 = np.float32(mean), np.float32(var)
    sd = float(np.sqrt(var32 + np.float32(1e-6)))  # as the reference: float32 sqrt(var + 1e-6)
    out = (x - float(mean32)).div_(sd)
    return out if every else out.masked_fill_(~valid, 0.0)


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


def _dense_valid(x: Tensor, spec: ModalitySpec) -> Tensor:
    """Valid pixels (1,H,W): finite in every channel and, for robust-standardised data, non-zero."""
    valid = torch.isfinite(x).all(0, keepdim=True)
    if spec.standardize == "robust":
        valid &= (x != 0).any(0, keepdim=True)
    return valid


def _masked_resize(resize: Callable[[Tensor], Tensor], x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``resize`` (bilinear) of ``x`` over its ``valid`` pixels only: values, and validity (at least
    half of an output pixel's interpolation weight fell on valid pixels; 0 elsewhere)."""
    num = resize(torch.where(valid, x, torch.zeros(())))
    ok = (den := resize(valid.float())) >= 0.5
    return torch.where(ok, num / den.clamp_min(1e-6), torch.zeros(())), ok


def _bilinear_crop(box: Box, size: int) -> Callable[[Tensor], Tensor]:
    return lambda t: TF.resized_crop(t, *box, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _resize_dense(x: Tensor, box: Box, size: int, spec: ModalitySpec) -> tuple[Tensor, Tensor]:
    """Bilinear crop-resize that ignores invalid pixels; returns values (C,S,S) and validity (1,S,S)."""
    x = x.float()
    valid = _dense_valid(x, spec)
    if bool(valid.all()):
        return _bilinear_crop(box, size)(x), torch.ones((1, size, size), dtype=torch.bool)
    return _masked_resize(_bilinear_crop(box, size), x, valid)


def _flip_dense(out: Tensor, valid: Tensor | None, spec: ModalitySpec) -> tuple[Tensor, Tensor | None]:
    """A dense map (and its validity) flipped horizontally, the channels of ``spec.hflip_negate`` negated."""
    out, valid = out.flip(-1), (None if valid is None else valid.flip(-1))
    for c in spec.hflip_negate:
        out[c] = -out[c]
    return out, valid


def _readonly_view(arr: np.ndarray) -> Tensor:
    """A tensor sharing a (possibly read-only) array's memory; the fast path only reads it."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": it is never written
        return torch.from_numpy(arr)


def _image_fast(x: Packed, box: Box, size: int, spec: ModalitySpec, flip: bool,
                norm: tuple[Tensor, Tensor] | None) -> Tensor:
    """The reference image crop-resize (+ flip) of packed (H,W,C) uint8 pixels: the same uint8 kernel reads
    the pixels in place (channels-last view, no (C,H,W) copy); flipping and the float conversion
    happen on the 224x224 output only, and the normalisation is one fused multiply-add
    ``x * (1 / (255 std)) - mean / std`` (within 1e-6 of the reference's ``(x / 255 - mean) / std``,
    a third of its time). ``norm``: (scale, shift) (C,1,1) or None."""
    top, left, h, w = box
    # the crop copied to contiguous (h,w,C) first: torch's uint8 kernel reads a channels-last block
    # directly and repacks a strided view pixel by pixel (2x the time, the same pixels: tested)
    crop = np.ascontiguousarray(x.array[top:top + h, left:left + w])  # may be the read-only array itself
    out = _bilinear(_readonly_view(crop).permute(2, 0, 1), size)
    hwc = out.permute(1, 2, 0)
    if hwc.is_contiguous():  # the kernel's channels-last output: flip + (C,S,S) in one numpy copy (torch's: 1.5x)
        a = hwc.numpy()
        out = torch.from_numpy(np.ascontiguousarray((a[:, ::-1] if flip else a).transpose(2, 0, 1))).float()
    else:
        out = (out.flip(-1) if flip else out).contiguous().float()
    return out.mul_(norm[0]).add_(norm[1]) if norm is not None else out.div_(255.0)


def _dense_fast(x: Packed, box: Box, size: int, spec: ModalitySpec) -> tuple[Tensor, Tensor | None]:
    """:func:`_resize_dense` of a packed one-channel map, bit for bit: only the crop is converted
    to float; whether any pixel of the whole map is invalid (which picks the reference's plain or
    masked interpolation) is read from the integers (0 = invalid for robust-standardised maps).
    The validity is None when every pixel is valid."""
    top, left, h, w = box
    crop = x.dense_float(top, left, h, w)
    if spec.standardize != "robust" or bool(x.array.all()):  # every pixel valid: valid = None
        return _bilinear(crop, size), None
    return _masked_resize(lambda t: _bilinear(t, size), crop, crop != 0)


def _resize64(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of (C,h,w) float64 to (C,S,S). Where neither axis shrinks, the
    antialiased kernel's weights are plain bilinear ones, and torch's plain bilinear kernel (~2x
    faster) gives the same values to ~1e-15 relative (tested); else the antialiased kernel."""
    c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    img = x.reshape(1, c, h, w)
    if h <= size and w <= size:
        out = torch._C._nn.upsample_bilinear2d(img, [size, size], False, None)
    else:
        out = torch._C._nn._upsample_bilinear2d_aa(img, [size, size], False, None)
    return out.reshape(c, size, size)


def _depth_fast(x: Packed, box: Box, size: int, spec: ModalitySpec, flip: bool, trunc: float) -> Tensor:
    """:func:`_resize_dense` + flip + :func:`robust_standardize` of a packed one-channel map in one
    float64 pass over the crop: the stored integers are resized as they are (exact in float64;
    the scale cancels in the standardisation: ``(s y - s m) / sqrt(s^2 v + 1e-6)``), statistics by
    :func:`trimmed_moments` on the resized values, one float32 conversion at the end. Output pixels
    with about half their weight on valid ones are kept or dropped by the reference's own float32
    computation, so the same pixels are kept. The values are the float64 computation's to ~1e-7,
    the float32 reference's within ~1e-4 x max(1, |z|) (its own rounding, amplified by mean / std on
    low-contrast crops; ``tests/data/test_fast_path.py``)."""
    top, left, h, w = box
    crop = torch.from_numpy(x.array[top:top + h, left:left + w].astype(np.float64))[None]
    ok = None
    if bool(x.array.all()):
        y = _resize64(crop, size)
    else:  # invalid pixels are 0 already: the masked numerator is the crop itself
        den = _resize64((crop != 0).double(), size)
        ok = den >= 0.5
        near = (den - 0.5).abs_() < 1e-4  # float32 rounding could put these on the other side: decide as
        if bool(near.any()):  # the reference does (its float32 antialiased weights are ~1e-6 off)
            ok[near] = _bilinear((crop != 0).float(), size)[near] >= 0.5
        y = torch.where(ok, _resize64(crop, size) / den.clamp_min(1e-6), torch.zeros((), dtype=torch.float64))
    if flip:
        y, ok = _flip_dense(y, ok, spec)
    vals = y.reshape(-1) if ok is None else y[ok]
    if vals.numel() == 0:
        return torch.zeros(y.shape, dtype=torch.float32)
    mean, var = _truncated_moments(vals, trunc)
    s = float(x.scale)
    out = (y - mean).mul_(s / math.sqrt(s * s * var + 1e-6)).float()
    return out if ok is None else out.masked_fill_(~ok, 0.0)


@functools.lru_cache(maxsize=4096)  # a few hundred crop sides per output size: computed once each
def nearest_exact_index(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of ``InterpolationMode.NEAREST_EXACT`` (torch's float32 arithmetic):
    ``min(floor((i + 0.5) * (in / out)), in - 1)``; read-only (shared by every call)."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64)
    idx = np.minimum(idx, in_size - 1)
    idx.flags.writeable = False
    return idx


def _categorical_fast(x: Packed, box: Box, size: int, flip: bool) -> Tensor:
    """The reference nearest crop-resize (+ flip) of packed class ids, bit for bit: the nearest source
    pixels are gathered from the crop box directly, and only the output becomes int64."""
    top, left, h, w = box
    rows = top + nearest_exact_index(h, size)
    cols = left + nearest_exact_index(w, size)
    if flip:
        cols = cols[::-1]
    return torch.from_numpy(x.array[rows[:, None], cols[None, :]].astype(np.int64))


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
        fast: the fast path. :class:`~multimae.data.codecs.Packed` fields (datasets built with
            ``packed=True``) are cropped as integers -- rgb resized by the same uint8 kernel in
            place, depth converted to float only inside the crop box, semseg gathered by nearest
            index from the crop box -- the reference's pixels, rgb normalised by one fused
            multiply-add (within 1e-6); a packed robust-standardised map (depth) is resized and
            standardised in float64 from its integers (:func:`_depth_fast`), other
            depth by :func:`robust_standardize_fast` (equal to ~1e-6); RGB JPEGs kept encoded
            (``data.decode=cuda``) become :class:`~multimae.data.device_decode.DeferredImage`.
            False (default): the reference path, which decodes packed fields first
            (:meth:`Packed.tensor`). Crop boxes, flips and seeding are the same in both.
        allow_missing: a sample may lack some of the modalities (``data.missing=allow``): those
            are left out of the output (the collator marks them absent); False: a DataError.

    ``__call__(sample, generator=None)`` returns the batch keys ``spec.key`` of the specs plus
    ``label``, ``__key__`` and any other string fields; other tensors are dropped.
    """

    def __init__(self, specs: Sequence[ModalitySpec | str | dict], image_size: int, train: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, seed: int | None = None, trunc: float = 0.1, eval_crop_pct: float = 1.0,
                 train_crop: str = "random_resized", fast: bool = False, allow_missing: bool = False) -> None:
        self.specs = by_key(resolve(list(specs)))
        self.allow_missing = bool(allow_missing)
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
        self.fast = bool(fast)
        self._process_gen: tuple[int, torch.Generator] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process_gen": None}  # a copy in another process starts its own stream

    def set_epoch(self, epoch: int) -> None:
        """Change the per-sample augmentation stream (call once per epoch)."""
        self.epoch = epoch

    def __repr__(self) -> str:
        return (f"PairedTransform(keys={list(self.specs)}, image_size={self.image_size}, train={self.train}, "
                f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}{', fast=True' if self.fast else ''})")

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
        if any(s.is_spatial and (s.key in sample or not self.allow_missing) for s in self.specs.values()):
            height, width = spatial_size(sample, list(self.specs.values()), where)
            box, flip = self.params(height, width, generator or self._generator(sample))
        out: dict = {}
        for key, spec in self.specs.items():
            if key not in sample:
                if self.allow_missing:
                    continue
                raise DataError(f"{where}: missing modality {key!r} (has {sorted(sample)})")
            out[key] = self._apply(sample[key], spec, box, flip, where)
            if spec.is_raster:  # its nodata pixels: the collator turns patches without a valid one into padding
                out[valid_key(key)] = self._raster_valid(sample[key], box, flip, spec)
        for key, value in sample.items():
            if key not in out and (isinstance(value, str) or (torch.is_tensor(value) and value.ndim == 0)):
                out[key] = value
        return out

    def _apply(self, x: object, spec: ModalitySpec, box: Box, flip: bool, where: str) -> object:
        if spec.kind == "text":
            if not isinstance(x, str):
                raise DataError(f"{where}: {spec.key!r} should be a str, got {type(x).__name__}")
            return x
        if isinstance(x, Packed):
            if x.kind != spec.kind:
                raise DataError(f"{where}: {spec.key!r} is a packed {x.kind} field, not {spec.kind}")
            if self.fast:
                return self._apply_packed(x, spec, box, flip)
            x = x.tensor()  # the reference: decode fully, then crop
        if not isinstance(x, Tensor):
            raise DataError(f"{where}: {spec.key!r} should be a tensor, got {type(x).__name__}")
        size = self.image_size // spec.stride
        if spec.kind == "dense":
            out, valid = _resize_dense(x, box, size, spec)
            return self._finish_dense(*(_flip_dense(out, valid, spec) if flip else (out, valid)), spec)
        if spec.kind == "categorical":
            out = TF.resized_crop(x[None], *box, [size, size], interpolation=InterpolationMode.NEAREST_EXACT)[0]
        else:
            out = _bilinear_crop(box, size)(x)
            out = spec.normalize(out.float() if out.is_floating_point() else out.float() / 255.0)
        return out.flip(-1) if flip else out

    def _raster_valid(self, x: Tensor, box: Box, flip: bool, spec: ModalitySpec) -> Tensor:
        """(1,S,S) bool: the output pixels of a raster with at least half their weight on valid
        input pixels (what :func:`_resize_dense` keeps)."""
        size = self.image_size // spec.stride
        valid = _dense_valid(x.float(), spec)
        if bool(valid.all()):
            return torch.ones((1, size, size), dtype=torch.bool)
        ok = _bilinear_crop(box, size)(valid.float()) >= 0.5
        return ok.flip(-1) if flip else ok

    def _finish_dense(self, out: Tensor, valid: Tensor | None, spec: ModalitySpec) -> Tensor:
        """Standardise (or zero the invalid pixels of) a resized dense map; ``valid`` None: all valid."""
        if spec.standardize == "robust":
            if not self.fast:
                return robust_standardize(out, valid.expand_as(out), self.trunc)
            return robust_standardize_fast(out, valid if valid is None else valid.expand_as(out), self.trunc,
                                           all_valid=valid is None)
        out = spec.normalize(out)  # per-band mean / std (rasters); unchanged without them
        return out if valid is None else torch.where(valid, out, torch.zeros(()))

    def _norm(self, spec: ModalitySpec) -> tuple[Tensor, Tensor] | None:
        """(scale, shift) float32 (C,1,1) of an image spec's normalisation of uint8 values,
        ``x * scale + shift == (x / 255 - mean) / std`` (computed in float64), made once."""
        if not spec.normalized:
            return None
        cache = self.__dict__.setdefault("_norms", {})
        if spec.key not in cache:
            cache[spec.key] = spec.norm_affine(1.0 / 255.0)
        return cache[spec.key]

    def _apply_packed(self, x: Packed, spec: ModalitySpec, box: Box, flip: bool) -> Tensor:
        """The fast path of one packed field (same values as the reference, see ``fast``)."""
        size = self.image_size // spec.stride
        if spec.kind == "categorical":
            return _categorical_fast(x, box, size, flip)
        if spec.kind == "image":
            if isinstance(x, EncodedJpeg):  # data.decode=cuda: decoded, cropped and resized on the device
                return DeferredImage(x.array.tobytes(), box, flip, size, self._norm(spec))
            return _image_fast(x, box, size, spec, flip, self._norm(spec))
        if spec.standardize == "robust" and x.array.ndim == 2:
            return _depth_fast(x, box, size, spec, flip, self.trunc)
        out, valid = _dense_fast(x, box, size, spec)
        return self._finish_dense(*(_flip_dense(out, valid, spec) if flip else (out, valid)), spec)


def resize_shorter_side(sample: dict, specs: dict[str, ModalitySpec], side: int) -> dict:
    """A copy of a raw sample whose spatial fields are resized so that the shorter side is
    ``side`` (never enlarged: a sample already that small is returned as is), to store
    pre-resized data (``multimae data shards --resize``).

    Per kind, as the transforms resample: images bilinear with antialiasing (uint8 kept), dense
    maps bilinear over valid pixels only (an output pixel with less than half its weight on valid
    pixels becomes invalid, 0), class maps nearest (half-pixel centres). The sizes follow
    torchvision's shorter-side resize. Packed fields are decoded first.
    """
    spatial = [k for k, spec in specs.items() if spec.is_spatial and _has_pixels(sample.get(k))]
    where = f"sample {sample.get('__key__', '?')}"
    if not spatial or min(spatial_size(sample, [specs[k] for k in spatial], where)) <= side:
        return dict(sample)
    out = dict(sample)
    for key in spatial:
        spec, x = specs[key], sample[key]
        x = x.tensor() if isinstance(x, Packed) else x
        if spec.kind == "categorical":
            out[key] = TF.resize(x[None], [side], interpolation=InterpolationMode.NEAREST_EXACT)[0]
        elif spec.kind == "image":
            out[key] = TF.resize(x, [side], interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            resize = functools.partial(TF.resize, size=[side], interpolation=InterpolationMode.BILINEAR, antialias=True)
            xf = x.float()
            out[key] = _masked_resize(resize, xf, _dense_valid(xf, spec))[0]
    return out


def spatial_size(sample: dict, specs: Sequence[ModalitySpec], where: str) -> tuple[int, int]:
    """The common (H, W) of a sample's spatial modalities; DataError if they differ."""
    sizes = {s.key: tuple(sample[s.key].shape[-2:]) for s in specs if s.is_spatial and _has_pixels(sample.get(s.key))}
    if not sizes:
        raise DataError(f"{where}: no spatial modality among {[s.key for s in specs]} (has {sorted(sample)})")
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{k} {h}x{w}" for k, (h, w) in sizes.items())
        raise DataError(f"{where}: modalities have different sizes ({desc})")
    return next(iter(sizes.values()))  # type: ignore[return-value]


def _has_pixels(value: object) -> bool:
    return torch.is_tensor(value) or isinstance(value, Packed)
