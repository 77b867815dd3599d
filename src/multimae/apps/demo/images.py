"""Pixels for the demo: safe decoding of uploaded images, PNG data URLs, rendering of
predictions, and the two edits (hue of rgb patches, class of semseg patches).

Everything here is a pure function of tensors and bytes; nothing touches the disk.
"""
from __future__ import annotations

import base64
import io
import threading
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from multimae.data.codecs import _png_bytes, image_pixels, open_image
from multimae.data.errors import DataError
from multimae.apps.demo.errors import DemoError
from multimae.model.losses import patchify, unpatchify
from multimae.core.modalities import ModalitySpec
from multimae.core.perf import trim_malloc
from multimae.evaluation.viz import palette, render


# Decoding an upload needs its full-size pixels once (a 6300x6300 PNG: 119 MB of RGB, several
# times that while converting); only this many decodes run at once, so that concurrent uploads
# queue instead of multiplying the peak memory.
_DECODES = threading.BoundedSemaphore(1)
RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA", "RGBa", "La", "I", "F")  # PIL resizes these in place


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, max_side: int) -> Tensor:
    """Image file bytes -> uint8 (3, H, W) RGB with max(H, W) <= ``max_side`` (shrunk, aspect
    kept), decoded by :func:`multimae.data.codecs.open_image` and
    :func:`~multimae.data.codecs.image_pixels`: upright (EXIF orientation), 16-bit scaled,
    transparency composited onto ``ALPHA_BACKGROUND``. A JPEG is decoded at a reduced scale
    (draft); other formats are decoded at full size, one upload at a time, and shrunk right
    away, and the freed memory is returned to the system.

    Raises DemoError: 413 for more than ``max_bytes`` bytes or ``max_pixels`` pixels (checked
    from the header, before decoding), 415 when the bytes are not an image format PIL knows,
    400 for a truncated or corrupt file.
    """
    if not data:
        raise DemoError("empty upload: send the image file as the request body")
    if len(data) > max_bytes:
        raise DemoError(f"upload of {len(data)} bytes is over the limit of {max_bytes} bytes", 413)
    try:  # the header only (PIL opens lazily): format and size, before any pixel is decoded
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                w, h = header.size
    except UnidentifiedImageError:
        raise DemoError("upload is not an image (PNG, JPEG, WebP, BMP, GIF, TIFF ... expected)", 415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DemoError(f"image too large: {e}", 413) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DemoError(f"image cannot be decoded ({e})") from None
    if w * h > max_pixels:
        raise DemoError(f"image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}", 413)
    if w < 1 or h < 1:
        raise DemoError(f"image has no pixels ({w}x{h})")
    with _DECODES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = open_image(data, "upload", draft=(max_side, max_side))
                if img.mode in RESIZABLE_MODES:  # shrink first: the full-size copy is freed at once
                    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                arr = image_pixels(img, 3, "upload")
                del img
                if max(arr.shape[:2]) > max_side:  # palette and 16-bit images: shrunk as RGB
                    small = Image.fromarray(arr)
                    small.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                    arr = np.asarray(small)
                out = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
                del arr
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DemoError(f"image too large: {e}", 413) from None
        except DataError as e:  # truncated / corrupt data
            raise DemoError(f"image cannot be decoded ({str(e).removeprefix('upload: ')})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DemoError(f"image cannot be decoded ({e})") from None
        finally:
            trim_malloc()
    return out


def png_data_url(img: Tensor) -> str:
    """(3, H, W) float in [0, 1] -> ``data:image/png;base64,...``."""
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(_png_bytes(arr, compress_level=1)).decode("ascii")


def class_colors(num_classes: int) -> list[str]:
    """The ``#rrggbb`` colour of every class, as :func:`multimae.evaluation.viz.render` draws them."""
    pal = (palette(num_classes) * 255 + 0.5).to(torch.uint8).tolist()
    return ["#%02x%02x%02x" % tuple(c) for c in pal]


def show(spec: ModalitySpec, x: Tensor, ref: Tensor | None = None) -> Tensor:
    """One modality of one sample (no batch dim) -> (3, h, w) float in [0, 1] at its own
    resolution. ``ref`` (the target) sets the colour range of dense maps."""
    return render(spec, x.float() if x.is_floating_point() else x, ref)


def prediction_image(spec: ModalitySpec, pred: Tensor, target: Tensor | None, patch_size: int) -> Tensor:
    """A task's prediction (C, H, W) -> (3, h, w) in [0, 1]; a norm-pix prediction is shown in
    pixel space with the target's per-patch statistics (when there is a target)."""
    pred = pred.float()
    if spec.norm_pix and target is not None:
        p = spec.patch(patch_size)
        tp = patchify(target[None].float(), p)
        mu, sd = tp.mean(-1, keepdim=True), (tp.var(-1, keepdim=True) + 1e-6).sqrt()
        grid = (target.shape[-2] // p, target.shape[-1] // p)
        pred = unpatchify(patchify(pred[None], p) * sd + mu, p, grid, target.shape[0])[0]
        return render(spec.with_(norm_pix=False), pred)
    return render(spec, pred, target.float() if target is not None and target.is_floating_point() else None)


def patch_mask(indices: list[int], grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Bool (H, W) at a modality's own resolution, True inside the given patches of the grid."""
    m = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    m[indices] = True
    m = m.reshape(1, 1, *grid).float()
    return torch.nn.functional.interpolate(m, size=size, mode="nearest")[0, 0].bool()


def shift_hue(spec: ModalitySpec, x: Tensor, region: Tensor, degrees: float) -> Tensor:
    """Rotate the hue of an image modality (C, H, W), normalised with ``spec.mean/std``, inside
    ``region`` (H, W) by ``degrees``; returns a new tensor in the same normalisation."""
    img = spec.denormalize(x).clamp(0, 1)
    factor = ((degrees / 360.0 + 0.5) % 1.0) - 0.5  # adjust_hue takes a turn fraction in [-0.5, 0.5]
    hued = TF.adjust_hue(img, factor)
    return spec.normalize(torch.where(region, hued, img))


def set_class(x: Tensor, region: Tensor, cls: int) -> Tensor:
    """Class ids (H, W) with ``region`` set to ``cls``."""
    return torch.where(region, torch.tensor(cls, dtype=x.dtype), x)
