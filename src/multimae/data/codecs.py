"""Encoding and decoding of sample fields, shared by the folder and shard formats.

How a file is decoded depends on the modality's kind and the file extension, never its name:

* ``image``: jpg / png / webp / bmp / tif -> uint8 (C,H,W) with C = ``spec.channels``, upright
  (EXIF orientation applied), 16-bit greyscale scaled to 8 bits, transparency composited onto the
  ImageNet mean colour (:func:`image_pixels`).
* ``dense``: ``.npy`` -> float32 as stored (NaN/inf are invalid pixels: the datasets set them
  to 0 and count them, :func:`multimae.data.fields.validate_sample`); 16-bit PNG ->
  ``value * png_scale`` (1,H,W) (the official MultiMAE code reads depth PNGs as
  ``value / 2**16``, the default here); an 8-bit one-channel PNG (8-bit depth) the same way,
  ``value * png_scale``, with a warning (256 levels); 8-bit PNGs of several channels -> signed
  unit values ``value / 127.5 - 1`` (how surface normals are usually stored).
* ``categorical``: 8- or 16-bit single-channel PNG, or ``.npy`` -> int64 (H,W).
* ``text``: ``.txt`` UTF-8; the image-level label: ``.cls`` holding a decimal integer.

16-bit PNGs are decoded by hand (PIL mode ``I;16`` -> numpy uint16) so that no value is lost.

The fast data path (:func:`decode_packed`, datasets built with ``packed=True``) keeps image, one-
channel dense and categorical image files as :class:`Packed` integers instead -- the same pixels,
:meth:`Packed.tensor` is bit for bit :func:`decode_field` -- so that
``PairedTransform(fast=True)`` converts only the crop it keeps.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo without PIL's per-image overhead; PIL decodes everything it does not take
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None
try:  # the compact storage of integer maps in shards (.zst fields)
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None
from torch import Tensor

from multimae.data.errors import DataError, ImageTooLargeError, notice_once
from multimae.data.rasters import RASTER_EXTS, decode_raster, load_npy
from multimae.core.modalities import ModalitySpec

OFFICIAL_PNG_SCALE = 1.0 / 2**16  # what the official code multiplies 16-bit depth PNGs by
DEFAULT_WRITE_PNG_SCALE = 1e-3  # our writers store metric depth in millimetres
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
EXTS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTS, "dense": ("png", "zst", "npy", "tif", "tiff"), "categorical": ("png", "zst", "npy"),
    "text": ("txt",),
}
LABEL_KEY = "label"

PngScale = float | Mapping[str, float] | None
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def scale_for(png_scale: PngScale, key: str, default: float = OFFICIAL_PNG_SCALE) -> float:
    """The 16-bit PNG scale of field ``key`` from a number, a per-key mapping, or None (default)."""
    if png_scale is None:
        return default
    if isinstance(png_scale, Mapping):
        return float(png_scale.get(key, default))
    return float(png_scale)


def open_image(data: bytes, where: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """An image file's bytes -> a loaded PIL image, upright: the EXIF orientation is applied (a
    phone photo tagged "rotate 90" comes out as it was shot). ``draft`` lets a JPEG decode at a
    reduced scale of at least that size. :class:`DataError` naming ``where`` for a truncated or
    unknown file."""
    try:
        img = Image.open(io.BytesIO(data))
        check_pixels(img.size, where)
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        if img.getexif().get(ORIENTATION_TAG, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own check, at twice its MAX_IMAGE_PIXELS
        raise ImageTooLargeError(f"{where}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{where}: truncated or not an image ({type(e).__name__}: {e})") from None
    return img


def check_pixels(size: tuple[int, int], where: str) -> None:
    """Refuse an image whose header declares more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
    (about 89 MP by default; PIL itself only warns below twice that) before it is decoded: a
    decompression bomb is bad data (:class:`ImageTooLargeError`, skippable), not an allocation of
    gigabytes. Raise ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit) to read larger images."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageTooLargeError(f"{where}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels is over the limit of "
                                 f"{limit} (PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)")


def _image_array(img: Image.Image) -> np.ndarray:
    """Pixel values with their full bit depth: uint8, uint16 or int32, (H,W) or (H,W,C).

    16-bit PNGs open in mode ``I;16`` (or ``I;16B``), read here as native uint16; palette
    images (``P``, how class maps are often stored) give their indices.
    """
    arr = np.asarray(img)
    return arr.astype(np.uint16, copy=False) if img.mode.startswith("I;16") else arr


# Transparent pixels are composited onto the ImageNet mean colour: after the input normalisation
# they are 0, the value that padding and masked-out inputs have too.
ALPHA_BACKGROUND = (124, 116, 104)


def image_pixels(img: Image.Image, channels: int, where: str) -> np.ndarray:
    """A decoded image -> uint8 (H,W,C) with C = ``channels`` (1 grey, 3 RGB, 4 RGBA).

    * 16-bit and 32-bit integer greyscale (``I;16``, ``I``) is scaled to 8 bits (``v / 257``,
      clipped to [0, 65535] first), not clipped at 255 (which turns most of it white);
    * float greyscale (``F``) is read as [0, 1] intensities;
    * transparency (``RGBA``, ``LA``, ``PA``, palette or ``RGB`` with a transparent colour) is
      composited onto :data:`ALPHA_BACKGROUND` unless 4 channels (RGBA) are asked for.
    """
    mode = {3: "RGB", 1: "L", 4: "RGBA"}.get(channels)
    if mode is None:
        raise DataError(f"{where}: cannot read a {channels}-channel image from an image file; use .npy")
    if img.mode.startswith("I") or img.mode == "F":
        v = np.asarray(img).astype(np.float64)
        v = np.clip(v, 0, 1) * 255 if img.mode == "F" else np.clip(v, 0, 65535) / 257.0
        img = Image.fromarray(np.rint(v).astype(np.uint8), "L")
    if mode != "RGBA" and (img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(bg, rgba)
    arr = np.asarray(img if img.mode == mode else img.convert(mode))
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _turbo_size(data: bytes, channels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG that simplejpeg decodes as the CPU path must (an RGB / greyscale
    JPEG without an EXIF block (its orientation), of 1 to PIL's decompression-bomb limit pixels,
    three channels asked for, a header simplejpeg parses), else None."""
    if simplejpeg is None or channels != 3 or not data.startswith(b"\xff\xd8") or b"Exif\x00\x00" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    ok = colorspace in ("YCbCr", "Gray") and 0 < height * width <= (Image.MAX_IMAGE_PIXELS or math.inf)
    return (height, width) if ok else None


def _jpeg_turbo(data: bytes, channels: int) -> np.ndarray | None:
    """uint8 (H,W,3) of an RGB (YCbCr or grey) JPEG decoded by simplejpeg -- the same
    libjpeg-turbo decoding as PIL's (same DCT and upsampling, bit for bit, tested), with less
    overhead -- or None where :func:`open_image` must decode it: what :func:`_turbo_size`
    declines (another channel count, CMYK, EXIF, over the pixel limit), or any decoder error
    (PIL then names it)."""
    if _turbo_size(data, channels) is None:
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except (ValueError, RuntimeError):
        return None


def read_pixels(data: bytes, channels: int, where: str) -> np.ndarray:
    """An image file -> uint8 (H,W,C) (:func:`image_pixels`); the one place image files are read:
    RGB JPEGs by :func:`_jpeg_turbo`, everything else (and what it declines) by :func:`open_image`."""
    arr = _jpeg_turbo(data, channels)
    return arr if arr is not None else image_pixels(open_image(data, where), channels, where)


def decode_image(data: bytes, channels: int, where: str) -> Tensor:
    """An image file -> uint8 (C,H,W), upright (EXIF), 16-bit scaled, alpha composited
    (:func:`image_pixels`)."""
    return _writable_tensor(read_pixels(data, channels, where).transpose(2, 0, 1))


def _writable_tensor(arr: np.ndarray) -> Tensor:
    """A tensor of ``arr``'s values owning writable memory (PIL's arrays are read-only; a one-channel
    image's (1,H,W) view is contiguous already, so ``ascontiguousarray`` alone would not copy it)."""
    out = np.ascontiguousarray(arr)
    return torch.from_numpy(out if out.flags.writeable else out.copy())


# --- compact integer maps (.zst: a zstd-compressed .npy of the PNG's pixels) ---------------------

ZSTD_LEVEL = 3  # decompression runs at ~1 GB/s whatever the level; 3 is zstd's default ratio
MAX_ZST_BYTES = 4 * (Image.MAX_IMAGE_PIXELS or 2**28) + 4096  # 2 bytes x PIL's bomb limit (2x its warning)
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}  # header bytes -> parsed (a few shapes)


def encode_zst(arr: np.ndarray) -> bytes:
    """An integer map (uint8 / uint16 (H,W)) -> ``.zst`` bytes: its ``.npy`` compressed by zstd.
    Lossless; decoding is a decompression and a header lookup (:func:`zst_array`), ~4x faster than
    a 16-bit PNG."""
    if zstandard is None:
        raise DataError("writing .zst fields needs the zstandard package (pip install zstandard)")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buf.getvalue())


def _npy_header(raw: bytes, where: str) -> tuple[int, np.dtype, tuple[int, ...]]:
    """(data offset, dtype, shape) of ``.npy`` bytes; parsed headers are cached (numpy's parser
    evaluates the header text, which costs more than copying a 256 px map)."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12:
        raise DataError(f"{where}: the .zst field does not hold a .npy array")
    start = 10 + int.from_bytes(raw[8:10], "little") if raw[6] == 1 else 12 + int.from_bytes(raw[8:12], "little")
    header = raw[:start]
    got = _NPY_HEADERS.get(header)
    if got is None:
        f = io.BytesIO(header)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{where}: unreadable .npy header in the .zst field ({e})") from None
        if fortran or dtype.hasobject or not np.issubdtype(dtype, np.number):
            raise DataError(f"{where}: the .zst field holds a {'Fortran-order ' if fortran else ''}{dtype} array; "
                            "expected C-order numbers")
        got = (dtype, tuple(shape))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = got
    return start, *got


def zst_array(data: bytes, where: str) -> np.ndarray:
    """``.zst`` bytes -> the stored array (read-only, sharing the decompressed buffer);
    :class:`DataError` naming ``where`` for a broken stream, an oversized one or a bad array."""
    if zstandard is None:
        raise DataError(f"{where}: reading .zst fields needs the zstandard package (pip install zstandard)")
    try:
        size = zstandard.frame_content_size(data)
        if size < 0 or size > MAX_ZST_BYTES:
            raise DataError(f"{where}: .zst field of unknown or too large size ({size} bytes, limit {MAX_ZST_BYTES})")
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise DataError(f"{where}: truncated or not a zstd stream ({e})") from None
    start, dtype, shape = _npy_header(raw, where)
    count = math.prod(shape)
    if len(raw) - start != count * dtype.itemsize:
        raise DataError(f"{where}: the .zst field holds {len(raw) - start} bytes for a {dtype} array of shape {shape}")
    return np.frombuffer(raw, dtype, count, offset=start).reshape(shape)


def _int_map(data: bytes, ext: str, where: str) -> np.ndarray:
    """The integer pixels of a PNG (or other image file) or of a ``.zst`` field, (H,W) or (H,W,C)."""
    if ext != "zst":
        return _image_array(open_image(data, where))
    arr = zst_array(data, where)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where}: a .zst map holds integers (a PNG's pixels), got dtype {arr.dtype}; store floats as .npy")
    return arr


def _chw(arr: np.ndarray, channels: int, where: str) -> np.ndarray:
    """(H,W) / (C,H,W) / (H,W,C) -> (C,H,W) with C == channels."""
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[0] != channels and arr.shape[-1] == channels:
        arr = arr.transpose(2, 0, 1)
    if arr.ndim != 3 or arr.shape[0] != channels:
        raise DataError(f"{where}: expected {channels} channel(s), got an array of shape {tuple(arr.shape)}")
    return arr


def decode_dense(data: bytes, ext: str, channels: int, png_scale: float, where: str) -> Tensor:
    """A dense map file -> float32 (C,H,W); see the module doc for the encodings."""
    if ext == "npy":
        arr = load_npy(data, where)
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(_chw(arr, channels, where), dtype=np.float32))
    arr = _int_map(data, ext, where)
    if arr.dtype == np.uint8 and channels != 1:
        out = arr.astype(np.float32) / 127.5 - 1.0
    else:
        if arr.dtype == np.uint8:  # a one-channel map (depth) stored in 8 bits: scaled like a 16-bit PNG's
            _notice_8bit(where, png_scale)
        out = (arr.astype(np.float64) * png_scale).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(_chw(out, channels, where)))


def _notice_8bit(where: str, png_scale: float) -> None:
    notice_once("8bit", where.rsplit("/", 1)[0],
                f"{where}: an 8-bit PNG as a one-channel dense map (depth): only 256 levels; read as "
                f"value x png_scale {png_scale:g} (0 = invalid), like a 16-bit PNG -- store depth as a 16-bit "
                "PNG or .npy to keep its precision")


def decode_categorical(data: bytes, ext: str, where: str) -> Tensor:
    """A class-id map file (8/16-bit PNG or .npy) -> int64 (H,W)."""
    arr = load_npy(data, where) if ext == "npy" else _int_map(data, ext, where)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{where}: class-id maps must be single-channel, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where}: class ids must be integers, got dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64))


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e})") from None


def decode_label(data: bytes, where: str) -> Tensor:
    try:
        return torch.tensor(int(data.decode("ascii").strip()), dtype=torch.int64)
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: a label must be a decimal integer, got {data[:32]!r}") from None


def decode_field(data: bytes, ext: str, spec: ModalitySpec, png_scale: float, where: str) -> Tensor | str:
    """Decode one field of modality ``spec`` stored with extension ``ext``."""
    ext = ext.lower()
    if ext not in EXTS[spec.kind]:
        raise DataError(f"{where}: a {spec.kind} modality cannot be read from a .{ext} file "
                        f"(expected one of {EXTS[spec.kind]})")
    if spec.kind == "image":
        return decode_image(data, spec.channels, where)
    if spec.is_raster:  # multi-band .tif / .npy: raw values, bands, nodata (multimae.data.rasters)
        if ext not in RASTER_EXTS:
            raise DataError(f"{where}: raster modality {spec.name!r} is read from .tif / .tiff / .npy, not .{ext}")
        return decode_raster(data, ext, spec, where)
    if spec.kind == "dense":
        return decode_dense(data, ext, spec.channels, png_scale, where)
    if spec.kind == "categorical":
        return decode_categorical(data, ext, where)
    return decode_text(data, where)


# --- packed decoding (the fast path) --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Packed:
    """A decoded field kept at its stored integer type until the transform crops it.

    ``array`` holds the pixels as decoded (possibly read-only, never written): uint8 (H,W,C) for
    an ``image``, uint8 / uint16 (H,W) for a one-channel ``dense`` map (value = ``array * scale``)
    or a ``categorical`` map (class ids). :meth:`tensor` gives exactly what :func:`decode_field`
    returns for the same file (the reference); :class:`~multimae.data.transforms.PairedTransform`
    with ``fast=True`` crops and resizes the integers directly instead, converting only the crop.
    """

    kind: str
    array: np.ndarray
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of :meth:`tensor`: (C,H,W) for image / dense, (H,W) for categorical."""
        a = self.array
        if self.kind == "image":
            return (a.shape[2], a.shape[0], a.shape[1])
        return (1, *a.shape) if self.kind == "dense" else tuple(a.shape)

    def tensor(self) -> Tensor:
        """The reference decoding: bit for bit what :func:`decode_field` gives for this file."""
        if self.kind == "image":
            return _writable_tensor(self.array.transpose(2, 0, 1))
        if self.kind == "dense":
            return self.dense_float(0, 0, *self.array.shape)
        return torch.from_numpy(self.array.astype(np.int64))

    def dense_float(self, top: int, left: int, height: int, width: int) -> Tensor:
        """float32 (1,h,w) of a crop of a dense map: the same values as ``tensor()`` cropped."""
        crop = self.array[top:top + height, left:left + width]
        return torch.from_numpy((crop.astype(np.float64) * self.scale).astype(np.float32)[None])


def decode_packed(data: bytes, ext: str, spec: ModalitySpec, png_scale: float, where: str) -> Tensor | str | Packed:
    """Like :func:`decode_field`, but image files (rgb), one-channel dense PNGs (depth) and
    categorical PNGs (semseg) come back as :class:`Packed` integers; every other field (``.npy``,
    multi-channel dense maps, text) is decoded as :func:`decode_field` does."""
    ext = ext.lower()
    if ext == "npy" or ext not in EXTS[spec.kind] or spec.kind == "text" or spec.is_raster:
        return decode_field(data, ext, spec, png_scale, where)
    if spec.kind == "image":
        return Packed("image", read_pixels(data, spec.channels, where))
    if spec.kind == "dense":
        if spec.channels != 1 or not (math.isfinite(png_scale) and png_scale > 1e-30):
            return decode_field(data, ext, spec, png_scale, where)
        arr = _int_map(data, ext, where)
        if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):  # e.g. an RGB or 32-bit file
            return decode_dense(data, ext, spec.channels, png_scale, where)  # its error, or a float tensor
        if arr.dtype == np.uint8:
            _notice_8bit(where, png_scale)
        return Packed("dense", arr, png_scale)
    arr = _int_map(data, ext, where)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16) or arr.size == 0:
        return decode_categorical(data, ext, where)  # its error, or an int64 tensor
    return Packed("categorical", arr)


@dataclass(frozen=True, eq=False)
class EncodedJpeg(Packed):
    """An RGB JPEG kept encoded for a decoder on the training device (``data.decode=cuda``):
    ``array`` holds the file's bytes (uint8, 1-D), ``height`` / ``width`` its header's size.
    :meth:`tensor` and :meth:`pixels` decode it on the CPU (the reference, and what
    :func:`decode_packed` gives); :class:`~multimae.data.transforms.PairedTransform` with
    ``fast=True`` only draws its crop and hands the bytes on
    (:class:`~multimae.data.device_decode.DeferredImage`)."""

    height: int = 0
    width: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (3, self.height, self.width)

    def pixels(self) -> np.ndarray:
        """uint8 (H,W,3): the pixels the CPU path decodes (:func:`read_pixels`)."""
        return read_pixels(self.array.tobytes(), 3, "an encoded JPEG")

    def tensor(self) -> Tensor:
        return _writable_tensor(self.pixels().transpose(2, 0, 1))


def jpeg_for_device(data: bytes, channels: int) -> EncodedJpeg | None:
    """``data`` as an :class:`EncodedJpeg` where a device decoder reads it as the CPU path does
    (what :func:`_jpeg_turbo` takes: an RGB / greyscale JPEG without EXIF orientation, within
    PIL's pixel limit, a header simplejpeg parses), else None (then decoded on the CPU)."""
    size = _turbo_size(data, channels)
    return None if size is None else EncodedJpeg("image", np.frombuffer(data, np.uint8), 1.0, *size)


def decode_encoded(data: bytes, ext: str, spec: ModalitySpec, png_scale: float, where: str) -> Tensor | str | Packed:
    """:func:`decode_packed`, but RGB JPEG images stay encoded (:class:`EncodedJpeg`) for the
    device decoder of ``data.decode=cuda``."""
    enc = jpeg_for_device(data, spec.channels) if spec.kind == "image" and ext.lower() in ("jpg", "jpeg") else None
    return enc if enc is not None else decode_packed(data, ext, spec, png_scale, where)


def decoder_for(packed: bool | str):  # type: ignore[no-untyped-def]
    """The field decoder of a dataset's ``packed`` setting: False :func:`decode_field` (the
    reference), True :func:`decode_packed`, ``"encoded"`` :func:`decode_encoded`."""
    if packed == "encoded":
        return decode_encoded
    return decode_packed if packed else decode_field


def validate_packed(value: Packed, spec: ModalitySpec, where: str) -> None:
    """:func:`validate_field` for a :class:`Packed` field, on its integers: the same checks and,
    when one fails, the same error (the reference check then runs on :meth:`Packed.tensor`)."""
    if value.kind != spec.kind:
        raise DataError(f"{where}: a packed {value.kind} field for a {spec.kind} modality")
    a = value.array
    if isinstance(value, EncodedJpeg):  # its header was read: only the channels can disagree
        if spec.channels != 3:
            raise DataError(f"{where}: an RGB JPEG for a {spec.channels}-channel image modality")
        return
    if spec.kind == "categorical":
        ok = a.size > 0 and int(a.max()) < spec.num_classes
    elif spec.kind == "dense":
        ok = spec.standardize != "robust" or bool(a.any())
    else:
        ok = a.ndim == 3 and a.shape[2] == spec.channels
    if not ok:
        validate_field(value.tensor(), spec, where)


# --- validation ----------------------------------------------------------------------------------


def validate_field(value: object, spec: ModalitySpec, where: str) -> None:
    """Check one decoded field against its spec; DataError naming ``where`` otherwise."""
    if spec.kind == "text":
        if not isinstance(value, str):
            raise DataError(f"{where}: expected text, got {type(value).__name__}")
        return
    if isinstance(value, Packed):
        return validate_packed(value, spec, where)
    if not torch.is_tensor(value):
        raise DataError(f"{where}: expected a tensor, got {type(value).__name__}")
    if spec.kind == "categorical":
        if value.ndim != 2 or value.dtype != torch.int64:
            raise DataError(f"{where}: expected int64 (H,W) class ids, got {value.dtype} {tuple(value.shape)}")
        out = (value < 0) | (value >= spec.num_classes)
        if spec.ignore_index is not None:
            out &= value != spec.ignore_index
        if value.numel() and bool(out.any()):
            extra = f" and not the ignore index {spec.ignore_index}" if spec.ignore_index is not None else ""
            raise DataError(f"{where}: class id {int(value[out][0])} outside [0, num_classes {spec.num_classes}){extra}")
        return
    if value.ndim != 3 or value.shape[0] != spec.channels:
        raise DataError(f"{where}: expected ({spec.channels},H,W), got shape {tuple(value.shape)}")
    if spec.kind == "dense":
        finite = torch.isfinite(value)
        if not bool(finite.any()):
            raise DataError(f"{where}: no valid pixel (every value is NaN/inf)")
        if spec.standardize == "robust" and not bool((finite & (value != 0)).any()):
            raise DataError(f"{where}: no valid pixel (every value is 0 or NaN/inf)")


# --- encoding (writers) --------------------------------------------------------------------------


def _png_bytes(arr: np.ndarray, format: str = "PNG", **kw: object) -> bytes:
    """An image array's file bytes: PNG, or ``format`` with PIL's save options ``kw``."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=format, **kw)
    return buf.getvalue()


def encode_png16(arr: np.ndarray) -> bytes:
    """uint16 (H,W) -> 16-bit grayscale PNG bytes (lossless)."""
    return _png_bytes(np.ascontiguousarray(arr, dtype=np.uint16), compress_level=1)


def encode_field(value: object, key: str, image_format: str = "jpg", png_scale: float = DEFAULT_WRITE_PNG_SCALE,
                 where: str = "", compact: bool = False) -> tuple[str, bytes]:
    """Encode one raw-sample field; returns ``(extension, bytes)``.

    By type: uint8 (C,H,W) -> ``image_format`` (jpg quality 95 without chroma subsampling, or png); int64 (H,W) -> 8- or
    16-bit PNG; float (1,H,W) -> 16-bit PNG of ``round(value / png_scale)``; float (C,H,W) with
    values in [-1, 1] -> 8-bit PNG of ``round((value + 1) * 127.5)``; str -> txt; 0-dim int -> cls.
    ``compact``: the one-channel integer maps (class ids, quantised depth) go to ``.zst``
    (:func:`encode_zst`, the same integers) instead of PNG.
    """
    where = where or key
    if isinstance(value, str):
        return "txt", value.encode("utf-8")
    if not torch.is_tensor(value):
        raise TypeError(f"{where}: cannot encode a {type(value).__name__}")
    if value.ndim == 0:
        return "cls", str(int(value)).encode("ascii")
    arr = value.detach().cpu().numpy()
    if arr.dtype == np.uint8 and arr.ndim == 3:
        hwc = np.ascontiguousarray(arr.transpose(1, 2, 0))
        hwc = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
        if image_format in ("jpg", "jpeg"):
            return "jpg", _png_bytes(hwc, "JPEG", quality=95, subsampling=0)
        return "png", _png_bytes(hwc, compress_level=1)
    if np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"{where}: class ids must lie in [0, 65535] to be stored as PNG, got [{lo}, {hi}]")
        ints = arr.astype(np.uint8 if hi < 256 else np.uint16)
        return ("zst", encode_zst(ints)) if compact else ("png", _png_bytes(ints, compress_level=1))
    if np.issubdtype(arr.dtype, np.floating) and arr.ndim == 3:
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: NaN/inf values cannot be stored; mark invalid pixels with 0")
        if arr.shape[0] == 1:
            q = np.rint(arr[0].astype(np.float64) / png_scale)
            if q.min() < 0 or q.max() > 65535:
                raise DataError(f"{where}: values [{arr.min():.4g}, {arr.max():.4g}] do not fit a 16-bit PNG at "
                                f"png_scale {png_scale:g} (max {65535 * png_scale:.4g})")
            return ("zst", encode_zst(q.astype(np.uint16))) if compact else ("png", encode_png16(q.astype(np.uint16)))
        if arr.min() < -1 - 1e-4 or arr.max() > 1 + 1e-4:
            raise DataError(f"{where}: multi-channel float maps are stored as signed unit values; got range "
                            f"[{arr.min():.4g}, {arr.max():.4g}] (save as .npy instead)")
        q = np.clip(np.rint((arr + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return "png", _png_bytes(np.ascontiguousarray(q), compress_level=1)
    raise TypeError(f"{where}: cannot encode a tensor of dtype {value.dtype} and shape {tuple(value.shape)}")


def compact_png(data: bytes, where: str) -> bytes | None:
    """A one-channel 8- or 16-bit PNG's pixels as ``.zst`` (lossless: the same integers), or None
    for any other file (kept as it is)."""
    if not data.startswith(b"\x89PNG"):
        return None
    arr = _image_array(open_image(data, where))
    return encode_zst(arr) if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16) else None


def png16_exact(scale: float) -> bool:
    """Whether ``value * scale`` in float32 maps back to the same uint16 (true for our scales)."""
    v = np.arange(65536, dtype=np.float64)
    return bool(np.array_equal(np.rint((v * scale).astype(np.float32).astype(np.float64) / scale), v)) \
        and math.isfinite(scale)
