"""Multi-band rasters: GeoTIFF / TIFF (any band count; uint8, uint16, int, float) and ``.npy``,
read through tifffile (no GDAL).

A raster modality is a ``dense`` :class:`~multimae.core.modalities.ModalitySpec` with ``bands``,
``band_names`` or ``nodata`` set (``spec.is_raster``). Its files are read with their raw values
(no PNG scale), as (bands, H, W): the band axis is the TIFF's samples / pages axis (the one that
is neither Y nor X; ``planarconfig`` contiguous or separate, or one band per page); an ``.npy``
holds (C,H,W) or (H,W,C) (the smaller of its first and last dims is the band axis). Bands are
named by ``spec.band_names``, else by the GeoTIFF's band descriptions (GDAL_METADATA tag 42112,
``<Item name="DESCRIPTION" sample="i">``). :func:`decode_raster` keeps ``spec.bands`` (indices or
names) and turns ``spec.nodata`` into NaN, which the transforms treat as invalid pixels.

Every bad input is one :class:`~multimae.data.errors.DataError` naming the file and the spec key.
"""
from __future__ import annotations

import io
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import torch
from torch import Tensor

from multimae.data.errors import DataError, notice_once
from multimae.core.modalities import ModalitySpec

RASTER_EXTS = ("tif", "tiff", "npy")
GDAL_METADATA = 42112  # XML with per-band <Item name="DESCRIPTION" sample="i">name</Item>
GDAL_NODATA = 42113  # ASCII nodata value


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A .npy file's array (no pickles); a DataError naming ``where`` if it is not one."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .npy array ({e})") from None


def _tiff_axes_to_chw(arr: np.ndarray, axes: str, where: str) -> np.ndarray:
    """A tifffile series array with ``axes`` -> (bands, H, W)."""
    keep = [i for i, (a, n) in enumerate(zip(axes, arr.shape)) if n != 1 or a in "YX"]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" not in axes or "X" not in axes or arr.ndim > 3:
        raise DataError(f"{where}: a raster must be (bands, rows, cols); this TIFF's first series is "
                        f"{axes} {tuple(arr.shape)}")
    if arr.ndim == 2:
        return arr[None]
    band = next(i for i, a in enumerate(axes) if a not in "YX")
    order = [band, axes.index("Y"), axes.index("X")]
    return arr.transpose(order)


def file_band_names(tif: object, count: int) -> tuple[str, ...] | None:
    """The GeoTIFF band descriptions (GDAL_METADATA), when every band has one."""
    tag = tif.pages[0].tags.get(GDAL_METADATA)  # type: ignore[attr-defined]
    if tag is None or not isinstance(tag.value, str):
        return None
    try:
        root = ET.fromstring(tag.value)
    except ET.ParseError:
        return None
    names = {int(item.get("sample")): item.text.strip() for item in root.iter("Item")
             if item.get("name", "").upper() == "DESCRIPTION" and item.get("sample") is not None and item.text}
    return tuple(names[i] for i in range(count)) if sorted(names) == list(range(count)) else None


def read_raster(data: bytes | str | os.PathLike, ext: str | None = None,
                where: str | None = None) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A raster file (bytes or a path) -> (array (bands, H, W) in the file's dtype, band names or None).

    ``ext``: ``tif`` / ``tiff`` / ``npy`` (default: the path's suffix).
    """
    return _read(data, ext, where)[:2]


def _tiff_nodata(tif: object) -> float | None:
    """The GeoTIFF's own nodata value (GDAL_NODATA tag), if any."""
    tag = tif.pages[0].tags.get(GDAL_NODATA)  # type: ignore[attr-defined]
    try:
        return float(str(tag.value).strip("\x00 ")) if tag is not None else None
    except ValueError:
        return None


def _read(data: bytes | str | os.PathLike, ext: str | None,
          where: str | None) -> tuple[np.ndarray, tuple[str, ...] | None, float | None]:
    """(array, band names, the file's nodata tag) of a raster file."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        path = Path(data)
        where = where or str(path)
        ext = ext or path.suffix[1:]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read the raster ({e})") from None
    where = where or "<raster bytes>"
    ext = (ext or "").lower()
    if ext == "npy":
        arr = _numeric(load_npy(bytes(data), where), where)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] < arr.shape[0]:
            arr = arr.transpose(2, 0, 1)
        if arr.ndim != 3:
            raise DataError(f"{where}: a raster .npy is (H,W), (C,H,W) or (H,W,C), got shape {tuple(arr.shape)}")
        return arr, None, None
    if ext not in ("tif", "tiff"):
        raise DataError(f"{where}: a raster is read from .tif / .tiff / .npy, not .{ext}")
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
            series = tif.series[0]
            arr = _tiff_axes_to_chw(series.asarray(), series.axes, where)
            names = file_band_names(tif, arr.shape[0])
            nodata = _tiff_nodata(tif)
    except DataError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, KeyError (missing codec), ...
        raise DataError(f"{where}: not a readable TIFF ({type(e).__name__}: {e})") from None
    return _numeric(arr, where), names, nodata


def _numeric(arr: np.ndarray, where: str) -> np.ndarray:
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: a raster holds integers or floats, got dtype {arr.dtype}")
    return arr


def band_indices(spec: ModalitySpec, count: int, file_names: Sequence[str] | None, where: str) -> list[int]:
    """The file band indices ``spec.bands`` selects (all bands when empty), checked against a
    file with ``count`` bands named ``spec.band_names`` or ``file_names``."""
    names = tuple(spec.band_names) or (tuple(file_names) if file_names else ())
    if spec.band_names and len(spec.band_names) != count:
        raise DataError(f"{where}: modality {spec.name!r} key band_names lists {len(spec.band_names)} bands "
                        f"{list(spec.band_names)}, the file has {count}")
    if not spec.bands:
        if count != spec.channels:
            raise DataError(f"{where}: modality {spec.name!r} has channels={spec.channels}, the file has "
                            f"{count} band(s); set channels={count} or keep some with the key bands")
        return list(range(count))
    out = []
    for b in spec.bands:
        if isinstance(b, str):
            if b not in names:
                known = list(names) if names else "none (set band_names, or select bands by index)"
                raise DataError(f"{where}: modality {spec.name!r} key bands: band {b!r} is not a band name "
                                f"of the file; its names: {known}")
            out.append(names.index(b))
        else:
            if b >= count:
                raise DataError(f"{where}: modality {spec.name!r} key bands: band index {b} is out of range, "
                                f"the file has {count} band(s) (0..{count - 1})")
            out.append(int(b))
    return out


def nodata_invalid(arr: np.ndarray, spec: ModalitySpec, where: str) -> np.ndarray | None:
    """(bands, H, W) bool, True where a value equals ``spec.nodata``; None when no nodata is set.
    A nodata value the file's dtype cannot hold (e.g. -9999 in uint16) is an error naming both."""
    if spec.nodata is None:
        return None
    nd = spec.nodata
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if float(nd) != int(nd) or not info.min <= nd <= info.max:
            raise DataError(f"{where}: modality {spec.name!r} key nodata={nd!r} cannot occur in this file's "
                            f"{arr.dtype} values ({info.min}..{info.max})")
        return arr == int(nd)
    if np.isnan(nd):
        return np.isnan(arr)
    return arr == arr.dtype.type(nd)


def same_nodata(a: float | None, b: float | None) -> bool:
    """Whether two nodata settings are the same (both None, equal, or both NaN)."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def decode_raster(data: bytes | str | os.PathLike, ext: str | None, spec: ModalitySpec, where: str) -> Tensor:
    """A raster file -> float32 (C,H,W) of ``spec``: its ``bands``, raw values, ``nodata`` -> NaN
    (an invalid pixel), non-finite values stay invalid."""
    arr, names, file_nodata = _read(data, ext, where)
    if file_nodata is not None and not same_nodata(file_nodata, spec.nodata):
        notice_once("nodata", spec.name, str(file_nodata),
                    f"{where}: the file's GDAL nodata tag is {file_nodata:g}, modality {spec.name!r} has "
                    f"nodata={spec.nodata!r}: values {file_nodata:g} are read as data (set the key nodata to "
                    "exclude them)")
    idx = band_indices(spec, arr.shape[0], names, where)
    arr = arr[idx]
    invalid = nodata_invalid(arr, spec, where)
    out = arr.astype(np.float32)
    if invalid is not None:
        out[invalid] = np.nan
    return torch.from_numpy(np.ascontiguousarray(out))


def gdal_metadata(band_names: Sequence[str]) -> str:
    """The GDAL_METADATA XML naming each band (what GDAL writes for band descriptions)."""
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{escape(n)}</Item>'
                    for i, n in enumerate(band_names))
    return f"<GDALMetadata>{items}</GDALMetadata>"


def write_raster(path: str | os.PathLike, arr: np.ndarray, band_names: Sequence[str] | None = None,
                 nodata: float | None = None, compression: str | None = "zlib") -> Path:
    """Write (bands, H, W) as a planar multi-band TIFF (band names and nodata as GDAL's tags,
    so GDAL / rasterio read them too), or an ``.npy`` (C,H,W) by the suffix."""
    path = Path(path)
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: write_raster takes (bands, H, W), got shape {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, arr)
        return path
    import tifffile

    tags = []
    if band_names:
        if len(band_names) != arr.shape[0]:
            raise ValueError(f"{path}: {len(band_names)} band names for {arr.shape[0]} bands")
        tags.append((GDAL_METADATA, "s", 0, gdal_metadata(band_names), True))
    if nodata is not None:
        tags.append((GDAL_NODATA, "s", 0, repr(float(nodata)) if isinstance(nodata, float) else str(nodata), True))
    tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="separate", compression=compression,
                     extratags=tags)
    return path
