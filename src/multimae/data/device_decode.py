"""JPEG decoding on the training device (``data.decode=cuda``): the workers read and crop, the GPU decodes.

With ``data.decode=cuda`` the folder / shard datasets keep RGB JPEGs encoded
(:class:`~multimae.data.codecs.EncodedJpeg`: the file's bytes and its header's size), the worker's
``PairedTransform(fast=True)`` draws the crop box and flip exactly as the CPU path does (same
generators, same draws) and hands on a :class:`DeferredImage` (bytes, box, flip, output size,
normalisation) instead of pixels; :class:`~multimae.data.loader.MaskCollator` gathers a batch's
deferred images into one :class:`DeferredImages` (``Batch.extra[DEFERRED]``, the batch tensor
holding zeros in their rows), and in the main process :class:`DeviceDecodeLoader` decodes them
with one batched ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA), crops,
resizes, flips and normalises them on that device and writes them into the batch tensor, which
is then on the device. Everything else of the batch (depth, semseg, ...) is prepared by the
workers as before.

Outputs: on the CPU (``device="cpu"``, what the tests run) the decoder is libjpeg-turbo as on the
CPU path and the resize is the same uint8 kernel, so the batch is bit for bit the CPU fast path's.
On CUDA nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two in some
pixels and the antialiased resize runs in float (CUDA has no uint8 kernel; rounded back to
integers, as the uint8 kernel does), so rgb differs from the CPU path by a few levels at most in a
few pixels; ``benchmarks/gpu_check.py`` (section ``jpeg_decode``) measures it and the samples/s.
Images the device decoder does not take (PNG, CMYK or EXIF-rotated JPEGs, ...) are decoded by the
workers as before and pass through unchanged. A JPEG that nvJPEG cannot decode is a
:class:`~multimae.data.errors.DataError` naming the sample (``data.on_error=skip`` cannot skip a
sample of a batch already formed: it is raised).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from multimae.core.batch import Batch
from multimae.data.errors import DataError
from multimae.data.resize import bilinear

DEFERRED = "__deferred__"  # Batch.extra key: {batch key: DeferredImages}
DECODE_MODES = ("cpu", "cuda")


@dataclass(frozen=True)
class DeferredImage:
    """One sample's image left to the device: the JPEG file's bytes, the crop box (top, left,
    height, width) and flip drawn by the transform, the output side and the normalisation
    ``x * scale + shift`` ((C,1,1) float32 each, or None for ``x / 255``)."""

    data: bytes
    box: tuple[int, int, int, int]
    flip: bool
    size: int
    norm: tuple[Tensor, Tensor] | None


@dataclass
class DeferredImages:
    """The deferred images of one batch key, made in the worker: their bytes in one uint8 tensor
    (``blob``, image ``i`` at ``offsets[i]:offsets[i + 1]``: one shared-memory block per batch,
    not one per image), boxes, flips, and ``index[i]``, the batch row of image ``i``."""

    blob: Tensor
    offsets: list[int]
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    index: list[int]
    size: int
    norm: tuple[Tensor, Tensor] | None

    @classmethod
    def of(cls, items: list[DeferredImage], index: list[int]) -> "DeferredImages":
        first = items[0]
        if any(d.size != first.size or (d.norm is None) != (first.norm is None) for d in items):
            raise ValueError("the deferred images of one batch key differ in size or normalisation")
        offsets = [0, *itertools.accumulate(len(d.data) for d in items)]
        blob = torch.frombuffer(bytearray(b"".join(d.data for d in items)), dtype=torch.uint8)
        return cls(blob, offsets, [d.box for d in items], [d.flip for d in items], list(index), first.size,
                   first.norm)

    def files(self) -> list[Tensor]:
        """Each image's bytes, a view of the blob."""
        return [self.blob[a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def finish(self, ready: Tensor, device: torch.device | str, uint8_resize: bool | None = None,
               keys: list[str] | None = None) -> Tensor:
        """``ready`` (B,C,S,S) float32 on ``device`` with the deferred rows decoded, cropped,
        resized, flipped and normalised there. ``uint8_resize``: resize the integers with torch's
        uint8 kernel (default where the device has it: the CPU) instead of in float + rounding."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        out = ready.to(device, non_blocking=True, copy=True)  # never writes into the batch it was given
        files = self.files()
        try:
            images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # find the file: decode one by one on the CPU
            for data, row in zip(files, self.index):
                try:
                    decode_jpeg(data, mode=ImageReadMode.RGB)
                except RuntimeError as e:
                    name = keys[row] if keys is not None and row < len(keys) else f"row {row}"
                    raise DataError(f"sample {name}: the JPEG could not be decoded ({e})") from None
            raise
        uint8 = (device.type == "cpu") if uint8_resize is None else uint8_resize
        x = torch.stack([_crop_resize(img, box, flip, self.size, uint8)
                         for img, box, flip in zip(images, self.boxes, self.flips)]).float()
        if self.norm is None:
            x.div_(255.0)
        else:
            x.mul_(self.norm[0].to(device)).add_(self.norm[1].to(device))
        out[torch.tensor(self.index, device=device)] = x
        return out


def _crop_resize(img: Tensor, box: tuple[int, int, int, int], flip: bool, size: int, uint8: bool) -> Tensor:
    """One decoded (C,H,W) uint8 image -> its (C,S,S) crop resized (antialiased bilinear) and
    flipped: uint8 via torch's uint8 kernel (the CPU fast path's pixels), else float rounded."""
    top, left, h, w = box
    if img.shape[-2] < top + h or img.shape[-1] < left + w:
        raise DataError(f"a decoded JPEG of {tuple(img.shape[-2:])} is smaller than its header said (box {box})")
    crop = img[:, top:top + h, left:left + w]
    # float: the same antialiased kernel, rounded (the uint8 kernel's output is integers too)
    out = bilinear(crop, size) if uint8 else bilinear(crop.float(), size).round_().clamp_(0, 255)
    return out.flip(-1) if flip else out


def gather_deferred(samples: list[dict[str, Any]]) -> dict[str, DeferredImages]:
    """Take the :class:`DeferredImage` fields out of a batch's samples (in the worker, before
    collation): per key, the batch's :class:`DeferredImages`. The deferred samples get zeros of
    their (C,S,S) shape instead, the others keep the tensor the CPU made, so that the batch
    collates as usual."""
    out: dict[str, DeferredImages] = {}
    for key in samples[0] if samples else ():
        rows = [i for i, s in enumerate(samples) if isinstance(s.get(key), DeferredImage)]
        if not rows:
            continue
        items = [samples[i][key] for i in rows]
        zeros = torch.zeros((3, items[0].size, items[0].size))
        for i in rows:
            samples[i][key] = zeros
        out[key] = DeferredImages.of(items, rows)
    return out


def decode_on_device(batch: Batch, device: torch.device | str, uint8_resize: bool | None = None) -> Batch:
    """``batch`` with its deferred images (``extra[DEFERRED]``) decoded on ``device``; a batch
    without any is returned as is."""
    deferred = batch.extra.get(DEFERRED)
    if not deferred:
        return batch
    keys = batch.extra.get("__key__")
    tensors = dict(batch.tensors)
    for key, d in deferred.items():
        tensors[key] = d.finish(tensors[key], device, uint8_resize, keys if isinstance(keys, list) else None)
    extra = {k: v for k, v in batch.extra.items() if k != DEFERRED}
    return Batch(tensors, dict(batch.pad), dict(batch.present), extra)


class DeviceDecodeLoader:
    """A training loader of ``(batch, plan)`` whose deferred JPEGs are decoded on ``device`` in
    the main process as each batch is taken (see the module doc). ``len``, ``dataset`` and the
    rest are the wrapped DataLoader's."""

    def __init__(self, loader: Any, device: torch.device | str, uint8_resize: bool | None = None) -> None:
        self.loader, self.device, self.uint8_resize = loader, torch.device(device), uint8_resize

    def __iter__(self) -> Iterator[tuple[Batch, Any]]:
        for batch, plan in self.loader:
            yield decode_on_device(batch, self.device, self.uint8_resize), plan

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
