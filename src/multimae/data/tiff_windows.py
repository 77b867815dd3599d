"""Windows of a TIFF too large for memory, read without loading it (:class:`TiffWindows`): only the
tiles or strips a window covers are decoded (``tifffile``), uncompressed data is read a row span at
a time. ``multimae predict --tiled`` (:mod:`multimae.apps.tiled`) reads its rasters through it."""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from multimae.data.errors import DataError

# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
DEFAULT_CACHE_BYTES = 16 << 20


class TiffWindows:
    """Windows of the first image of a TIFF, read without loading it: ``read(y0, y1, x0, x1)`` ->
    (C, y1-y0, x1-x0) array of the file's dtype. Tiled and striped files decode only the segments
    a window covers (an LRU cache of ``cache_bytes`` keeps recent ones); uncompressed contiguous
    data is read a row span at a time. Any failure is a DataError naming the file."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        import tifffile

        self.path = Path(path)
        where = f"raster {self.path}"
        if not self.path.is_file():
            raise DataError(f"{where}: no such file")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as e:  # not a TIFF, or a broken header
            raise DataError(f"{where}: not a readable TIFF ({type(e).__name__}: {e})") from None
        try:
            page = self._tif.pages.first
            shaped = page.shaped  # (separate samples, depth, length, width, contig samples)
            dtype = page.dtype
        except Exception as e:  # a broken first IFD
            self._tif.close()
            raise DataError(f"{where}: not a readable TIFF ({type(e).__name__}: {e})") from None
        self._page = page
        self.tiff = self._tif  # the open file (its tags: band names, georeferencing)
        try:
            if dtype is None:
                raise DataError(f"{where}: unsupported sample format ({page.sampleformat}, "
                                f"{page.bitspersample}-bit)")
            if shaped[1] != 1:
                raise DataError(f"{where}: a volume (depth {shaped[1]}); tiled prediction takes 2-D rasters")
            if page.is_subsampled or page.bitspersample % 8 or page.fillorder != 1:
                raise DataError(f"{where}: chroma-subsampled or bit-packed data is not supported for tiled reads")
            for table, code in ((tifffile.TIFF.DECOMPRESSORS, page.compression),
                                (tifffile.TIFF.UNPREDICTORS, page.predictor)):
                if code != 1:
                    try:
                        table[code]
                    except KeyError as e:  # LZW, JPEG, ... need the imagecodecs package
                        raise DataError(f"{where}: cannot decode it: {str(e).strip(chr(34))} (pip install imagecodecs, "
                                        f"or re-save it with deflate compression)") from None
            self.planes, self.height, self.width, self.samples = shaped[0], shaped[2], shaped[3], shaped[4]
            self.dtype = np.dtype(dtype)
            self._raw = page.compression == 1 and page.predictor == 1 and page.is_contiguous
            self._seg = (page.tilelength, page.tilewidth) if page.is_tiled else \
                (page.rowsperstrip or self.height, self.width)
            self._seg_bytes = self._seg[0] * self._seg[1] * self.samples * self.dtype.itemsize
            if not self._raw and self._seg_bytes > max(cache_bytes, 64 << 20):
                raise DataError(f"{where}: stores compressed strips of {self._seg[0]} rows ({self._seg_bytes >> 20} "
                                f"MB each once decoded); tiled prediction needs a tiled TIFF or small strips (e.g. "
                                f"gdal_translate -co TILED=YES, or tifffile.imwrite(..., tile=(256, 256)))")
        except DataError:
            self.close()
            raise
        self.channels = self.planes * self.samples
        self.where = where
        self.geotags = {code: page.tags[code] for code in GEO_TAGS if code in page.tags}
        self._grid = (math.ceil(self.height / self._seg[0]), math.ceil(self.width / self._seg[1]))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_cap = max(cache_bytes // max(1, self._seg_bytes), 4)
        self._decode_args: dict[str, Any] = {"_fullsize": True}
        if page.compression in (6, 7, 33007, 34892):  # JPEG
            self._decode_args.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)

    # -- context
    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> "TiffWindows":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reads
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"window {(y0, y1, x0, x1)} outside {self.height}x{self.width}")
        try:
            return self._read_raw(y0, y1, x0, x1) if self._raw else self._read_segments(y0, y1, x0, x1)
        except DataError:
            raise
        except Exception as e:  # truncated file, corrupt segment, codec missing
            raise DataError(f"{self.where}: cannot read rows {y0}:{y1}, columns {x0}:{x1} "
                            f"({type(e).__name__}: {e})") from None

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        fh = self._tif.filehandle
        dt = self.dtype.newbyteorder(self._tif.byteorder)
        offset = self._page.dataoffsets[0]
        S, W, item = self.samples, self.width, dt.itemsize
        out = np.empty((self.planes, y1 - y0, x1 - x0, S), self.dtype)
        n = (x1 - x0) * S
        for p in range(self.planes):
            base = offset + p * self.height * W * S * item
            for i, y in enumerate(range(y0, y1)):
                fh.seek(base + ((y * W + x0) * S) * item)
                buf = fh.read(n * item)
                if len(buf) != n * item:
                    raise DataError(f"{self.where}: truncated (row {y} ends past the end of the file)")
                out[p, i] = np.frombuffer(buf, dt).reshape(x1 - x0, S)
        return _chw(out)

    def _segment(self, index: int) -> np.ndarray:
        seg = self._cache.get(index)
        if seg is not None:
            self._cache.move_to_end(index)
            return seg
        page, fh = self._page, self._tif.filehandle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if offset and count:
            fh.seek(offset)
            data = fh.read(count)
            if len(data) != count:
                raise DataError(f"{self.where}: truncated (segment {index} ends past the end of the file)")
        else:
            data = None  # an empty (sparse) segment: tifffile fills it with the nodata value
        seg, _, shape = page.decode(data, index, **self._decode_args)
        if seg is None:
            seg = np.full(shape, page.nodata, self.dtype)
        seg = seg.reshape(shape[1], shape[2], shape[3])  # (rows, cols, contig samples)
        self._cache[index] = seg
        if len(self._cache) > self._cache_cap:
            self._cache.popitem(last=False)
        return seg

    def _read_segments(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        sh, sw = self._seg
        rows, cols = self._grid
        out = np.empty((self.planes, y1 - y0, x1 - x0, self.samples), self.dtype)
        for p in range(self.planes):
            for r in range(y0 // sh, (y1 - 1) // sh + 1):
                for c in range(x0 // sw, (x1 - 1) // sw + 1):
                    seg = self._segment((p * rows + r) * cols + c)
                    ya, yb = max(y0, r * sh), min(y1, (r + 1) * sh)
                    xa, xb = max(x0, c * sw), min(x1, (c + 1) * sw)
                    out[p, ya - y0:yb - y0, xa - x0:xb - x0] = seg[ya - r * sh:yb - r * sh, xa - c * sw:xb - c * sw]
        return _chw(out)


def _chw(a: np.ndarray) -> np.ndarray:
    """(planes, h, w, samples) -> (C, h, w): one of planes / samples is 1."""
    P, h, w, S = a.shape
    return a[..., 0] if S == 1 else np.ascontiguousarray(np.moveaxis(a[0], -1, 0)) if P == 1 else \
        np.ascontiguousarray(np.moveaxis(a, -1, 1).reshape(P * S, h, w))


# ------------------------------------------------------------------------------------ blending
