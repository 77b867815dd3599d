"""What ``multimae predict`` writes, with memory bounded by design.

A prediction is kept at the model's resolution (:class:`LowRes`: (C, s, s) logits or values and
how they map onto the image) and is only brought to the image's full size band by band (a few
rows at a time, within :data:`BAND_BYTES` of float values): a segmentation head's logits are
never materialised at full resolution, only its uint8 / uint16 class ids; previews are uint8;
arrays (``.npy``) are written in a compact dtype straight into a file (``numpy`` memory map)
under a temporary name, renamed when complete.

Also here: the run identity recorded in ``OUT/multimae_predict.json`` (a re-run into the same
folder with another run or other settings is refused), the pixel budget checked from the
image header before decoding, and the output name of an input (its relative path, mirrored).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from multimae.data.errors import DataError

BAND_BYTES = 32 << 20  # float values of one band of full-resolution rows
DEFAULT_MAX_PIXELS = 40_000_000  # as the demo's limit (multimae.apps.demo.engine.Limits.max_pixels)
ARRAY_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class LowRes:
    """A (C, hs, ws) prediction for an (h, w) image: upsampled bilinearly (``align_corners=False``,
    as ``F.interpolate``) to ``up`` = (Uh, Uw), then cropped to its top-left (h, w) (a letterbox
    square: ``up`` = (max(h,w),) * 2; a plain resize: ``up`` = (h, w))."""

    p: Tensor
    size: tuple[int, int]
    up: tuple[int, int]

    @property
    def channels(self) -> int:
        return int(self.p.shape[0])

    def band(self, y0: int, y1: int) -> Tensor:
        """Rows ``y0:y1`` of the full-resolution prediction: float (C, y1-y0, w)."""
        h, w = self.size
        r0, r1, rl = _taps(self.p.shape[-2], self.up[0], y0, y1)
        c0, c1, cl = _taps(self.p.shape[-1], self.up[1], 0, w)
        lo, hi = int(r0.min()), int(r1.max()) + 1
        rows = self.p[:, lo:hi].float()
        cols = rows[..., c0] * (1 - cl) + rows[..., c1] * cl  # (C, r, w), as torch: columns first
        return cols[:, r0 - lo] * (1 - rl)[:, None] + cols[:, r1 - lo] * rl[:, None]

    def bands(self, budget: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(y0, y1, band)`` covering every row, each band within ``budget`` (default
        :data:`BAND_BYTES`) bytes of float32."""
        h, w = self.size
        budget = BAND_BYTES if budget is None else budget
        step = max(1, budget // max(1, 4 * self.channels * w))
        for y0 in range(0, h, step):
            y1 = min(h, y0 + step)
            yield y0, y1, self.band(y0, y1)

    def class_ids(self, out: np.ndarray) -> None:
        """Fill ``out`` (h, w) with the argmax over channels of the full-resolution prediction,
        cell by cell (the output block between four neighbouring source pixels), computing only
        the classes that can win in a cell: bilinear values are convex combinations of the four
        corners, so a class whose largest corner value is below another's smallest never wins."""
        p = self.p.float()
        C, hs, ws = p.shape
        h, w = self.size
        if 4 * C * h * w <= BAND_BYTES:  # small: directly
            out[:] = self.full().argmax(0).numpy()
            return
        nr, nc = (torch.arange(hs) + 1).clamp(max=hs - 1), (torch.arange(ws) + 1).clamp(max=ws - 1)
        corners = torch.stack([p, p[:, nr], p[:, :, nc], p[:, nr][:, :, nc]])
        can = corners.amax(0) >= corners.amin(0).amax(0)  # (C, hs, ws): may win in the cell
        del corners
        r0, _, rl = _taps(hs, self.up[0], 0, h)
        c0, _, cl = _taps(ws, self.up[1], 0, w)
        for a, ys, ye in _runs(r0):
            wy = rl[ys:ye, None]
            for b, xs, xe in _runs(c0):
                ks = can[:, a, b].nonzero()[:, 0]
                if len(ks) == 1:
                    out[ys:ye, xs:xe] = int(ks[0])
                    continue
                q = p[ks][:, [a, int(nr[a])]][:, :, [b, int(nc[b])]]  # (K, 2, 2) corners
                wx = cl[xs:xe]
                top = q[:, 0, 0, None] * (1 - wx) + q[:, 0, 1, None] * wx  # as torch: columns, then rows
                bot = q[:, 1, 0, None] * (1 - wx) + q[:, 1, 1, None] * wx
                val = top[:, None] * (1 - wy) + bot[:, None] * wy  # (K, rows, cols)
                out[ys:ye, xs:xe] = ks[val.argmax(0)].numpy()

    def full(self) -> Tensor:
        """The whole (C, h, w) prediction (the Python API; memory C*h*w floats)."""
        return self.band(0, self.size[0])


def _runs(idx: Tensor) -> list[tuple[int, int, int]]:
    """``(value, start, end)`` of each run of equal values of a non-decreasing index vector."""
    vals, counts = torch.unique_consecutive(idx, return_counts=True)
    ends = counts.cumsum(0)
    return [(int(v), int(e - c), int(e)) for v, c, e in zip(vals, counts, ends)]


def _taps(n_in: int, n_out: int, i0: int, i1: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices (lo, hi) and weight of hi for outputs ``i0:i1`` of a bilinear resize
    ``n_in -> n_out`` (PyTorch's ``align_corners=False`` rule)."""
    scale = n_in / n_out
    src = ((torch.arange(i0, i1, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, src - lo


# ------------------------------------------------------------------------------------- files

def _write_png(path: Path, arr: np.ndarray) -> None:
    """An 8-bit / 16-bit grey or RGB array -> a PNG file, written atomically (fast compression)."""
    from multimae.data.codecs import _png_bytes
    from multimae.data.prepare.writing import write_bytes

    write_bytes(path, _png_bytes(arr, compress_level=1))


def write_ids(path: Path, pred: LowRes, num_classes: int) -> np.ndarray:
    """Class ids (argmax over the channels, band by band) -> PNG (8-bit, 16-bit past 256 classes);
    returns the (h, w) ids."""
    ids = np.empty(pred.size, np.uint8 if num_classes <= 256 else np.uint16)
    pred.class_ids(ids)
    _write_png(path, ids)
    return ids


def write_colour(path: Path, ids: np.ndarray, num_classes: int) -> None:
    from multimae.evaluation.viz import palette

    pal = (palette(max(num_classes, 1)) * 255).round().byte().numpy()
    _write_png(path, pal[np.minimum(ids, len(pal) - 1)])


def write_depth_png(path: Path, pred: LowRes, scale: float) -> None:
    """Channel 0 as a 16-bit PNG of ``round(value / scale)`` (clipped to [0, 65535])."""
    q = np.empty(pred.size, np.uint16)
    for y0, y1, b in pred.bands():
        q[y0:y1] = np.clip(np.rint(b[0].double().numpy() / scale), 0, 65535).astype(np.uint16)
    _write_png(path, q)


def write_preview(path: Path, pred: LowRes, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> None:
    """A uint8 RGB picture: three channels as colours (``mean`` / ``std`` undo an image
    normalisation, else values in [-1, 1]); otherwise channel 0 through a colour map scaled to its
    2-98 % range (taken at model resolution)."""
    from multimae.evaluation.viz import colormap

    rgb = pred.channels == 3
    v = pred.p[0].float().flatten()
    lo, hi = torch.quantile(v, 0.02), torch.quantile(v, 0.98)
    m = torch.tensor(mean if mean is not None else (0.5, 0.5, 0.5)).view(3, 1, 1)  # [-1, 1] -> [0, 1]
    s = torch.tensor(std if std is not None else (0.5, 0.5, 0.5)).view(3, 1, 1)
    img = np.empty((*pred.size, 3), np.uint8)
    for y0, y1, b in pred.bands():
        x = (b * s + m).clamp(0, 1) if rgb else colormap((b[0] - lo) / (hi - lo + 1e-6))
        img[y0:y1] = (x.permute(1, 2, 0) * 255).round().byte().numpy()
    _write_png(path, img)


def write_array(path: Path, pred: LowRes, dtype: str) -> None:
    """The (C, h, w) values as ``.npy`` of ``dtype``, written band by band into a memory-mapped
    temporary file renamed into place when complete (no partial file on failure)."""
    from multimae.core.io import save_file_atomic

    def fill(tmp: Path) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=ARRAY_DTYPES[dtype], shape=(pred.channels, *pred.size))
        for y0, y1, b in pred.bands():
            arr[:, y0:y1] = b.numpy()
        arr.flush()
        del arr

    save_file_atomic(path, fill)


# ---------------------------------------------------------------------------- inputs, names

def check_pixels(data: bytes, max_pixels: int, where: str) -> None:
    """A DataError when the image header says more than ``max_pixels`` pixels (before decoding)."""
    if not max_pixels:
        return
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: over any budget
        raise DataError(f"{where}: over the budget of {max_pixels} pixels (--max-pixels; {e})") from None
    except Exception:  # not an image: decoding says so, naming the file
        return
    if w * h > max_pixels:
        raise DataError(f"{where}: {w}x{h} = {w * h} pixels is over the budget of {max_pixels} "
                        f"(--max-pixels)")


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output names of explicit input files: each one's path relative to their common folder,
    without its extension (``x/a.png``, ``y/a.png`` -> ``x/a``, ``y/a``)."""
    parents = [os.path.abspath(p.parent) for p in paths]
    base = os.path.commonpath(parents) if parents else ""
    return [Path(os.path.relpath(os.path.abspath(p), base)).with_suffix("").as_posix() for p in paths]


# ---------------------------------------------------------------------------- run identity

def fingerprint(ckpt: Path) -> str:
    """sha256 of a checkpoint's weights file size and first 8 MB (tells two checkpoints apart
    cheaply)."""
    from multimae.checkpoint.io import WEIGHTS_FILE

    f = ckpt / WEIGHTS_FILE if ckpt.is_dir() else ckpt
    h = hashlib.sha256()
    if f.is_file():
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(8 << 20))
    return h.hexdigest()[:16]


def run_identity(predictor: Any, **settings: Any) -> dict[str, Any]:
    """What makes a folder's predictions one run's: the checkpoint (path and weights) and the
    ``settings`` that change the outputs."""
    ckpt = Path(predictor.run)
    return {"checkpoint": str(ckpt.resolve()), "weights": fingerprint(ckpt),
            "inputs": [s.name for s in predictor.inputs], "image_size": predictor.image_size, **settings}


def check_identity(meta_path: Path, identity: dict[str, Any]) -> None:
    """Refuse to write into a folder holding another run's (or other settings') predictions."""
    if not meta_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text()).get("identity")
    except (ValueError, OSError) as e:
        raise DataError(f"{meta_path}: unreadable ({e}); use a new --out folder") from None
    if old is None or old == identity:
        return
    diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    what = ", ".join(f"{k} {old.get(k)!r} -> {identity.get(k)!r}" for k in diff[:3])
    raise DataError(f"{meta_path.parent}: holds predictions of another run or settings ({what}); "
                    f"use a new --out folder (or remove this one)")
