"""Tiled prediction of rasters larger than memory (``multimae predict --tiled``).

:func:`predict_tiled` reads a TIFF window by window (only the tiles or strips a window covers are
decoded, through ``tifffile``; uncompressed data is read row span by row span), runs overlapping
windows of the model's size at the raster's native resolution, blends them with a separable linear
ramp weight (so seams vanish) and writes each output as a tiled TIFF, tile by tile,
carrying the input's georeferencing tags. Nothing ever holds the whole raster: the blended
outputs are accumulated for one band of rows (``tile + window`` rows by the raster's width, or
by a column strip of it) and a row of output tiles is handed, tile by tile, to a writer thread as
soon as no later window can touch it.

Peak memory (:func:`memory_bound`) is bounded whatever the raster's size: it depends on the
window, the tile size, the batch, the decoded-segment cache and ``band_bytes``. The blending band
is ``(tile + window)`` rows by at most the columns ``band_bytes`` allows; a wider raster is done
in column strips (each a temporary tiled TIFF, merged by copying compressed tiles).
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.core.io import commit, save_bytes_atomic
from multimae.data.errors import DataError
from multimae.data.tiff_windows import DEFAULT_CACHE_BYTES, TiffWindows

TIFF_EXTS = (".tif", ".tiff")
DEFAULT_TILE = 256
QUEUE_TILES = 16  # output tiles waiting for a writer thread, per task
DEFAULT_BAND_BYTES = 256 << 20  # blended outputs of one band of rows; wider rasters go in column strips
OUT_KINDS = ("ids", "float16", "float32")

RunFn = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]


def ramp(window: int, overlap: int) -> np.ndarray:
    """1-D blending weight of a window: rises linearly over ``overlap`` pixels at both ends (never 0),
    1 in the middle; a window's 2-D weight is the outer product of two."""
    i = np.arange(window, dtype=np.float64) + 0.5
    if overlap <= 0:
        return np.ones(window, np.float32)
    return np.minimum(1.0, np.minimum(i, window - i) / overlap).astype(np.float32)


def starts(n: int, window: int, stride: int) -> list[int]:
    """Window starts covering ``n`` pixels with ``stride``, the last one flush with the end."""
    if n <= window:
        return [0]
    k = math.ceil((n - window) / stride) + 1
    return sorted({min(i * stride, n - window) for i in range(k)})


def weight_sum(n: int, window: int, overlap: int, stride: int) -> np.ndarray:
    """Per pixel along one axis, the summed 1-D weights of the windows covering it (the 2-D sum is
    the outer product of the row and column sums: the windows form a grid)."""
    w = ramp(window, overlap)
    s = np.zeros(n, np.float32)
    for a in starts(n, window, stride):
        b = min(n, a + window)
        s[a:b] += w[:b - a]
    return s


# ------------------------------------------------------------------------------------ writing

class _TileWriter:
    """A tiled TIFF written by a thread from tiles handed over in row-major order through a queue
    of :data:`QUEUE_TILES` (so at most that many tiles, plus one being built and one being
    compressed, exist at once); written under a temporary name and renamed when complete."""

    def __init__(self, path: Path, height: int, width: int, channels: int, dtype: np.dtype, tile: int,
                 extratags: list[tuple], compression: str | None) -> None:
        import tifffile

        self.path, self.tmp = path, path.with_name(path.name + ".part")
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_TILES)
        self.error: BaseException | None = None
        kwargs = _tiff_kwargs(height, width, channels, dtype, tile, extratags, compression)
        if compression == "zlib":
            kwargs["compressionargs"] = {"level": 1}

        def tiles() -> Iterator[np.ndarray]:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        def work() -> None:
            try:
                tifffile.imwrite(self.tmp, tiles(), **kwargs)
            except BaseException as e:  # handed to the main thread by put() / close()
                self.error = e
                while True:  # unblock a producer waiting on the queue
                    try:
                        self.q.get_nowait()
                    except queue.Empty:
                        break

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread = threading.Thread(target=work, name=f"tiff-writer {path.name}", daemon=True)
        self.thread.start()

    def put(self, tile: np.ndarray) -> None:
        while self.error is None:
            try:
                self.q.put(tile, timeout=0.5)
                return
            except queue.Full:
                pass
        raise DataError(f"{self.path}: writing failed ({type(self.error).__name__}: {self.error})")

    def close(self, ok: bool) -> None:
        if self.thread.is_alive():
            try:
                self.q.put(None if ok else DataError("aborted"), timeout=60)
            except queue.Full:
                pass
            self.thread.join()
        if ok and self.error is None:
            commit(self.tmp, self.path)  # the user's umask, fsync, rename
            return
        self.tmp.unlink(missing_ok=True)
        if ok and self.error is not None:
            raise DataError(f"{self.path}: writing failed ({type(self.error).__name__}: {self.error})")


def _tiff_kwargs(height: int, width: int, channels: int, dtype: np.dtype, tile: int, extratags: list[tuple],
                 compression: str | None) -> dict[str, Any]:
    """``tifffile.imwrite``'s arguments for a tiled (height, width[, channels]) TIFF (BigTIFF past 3 GB)."""
    return dict(shape=(height, width, channels) if channels > 1 else (height, width), dtype=dtype, tile=(tile, tile),
                photometric="minisblack", planarconfig="contig" if channels > 1 else None, extratags=extratags,
                compression=compression, metadata=None,
                bigtiff=height * width * channels * np.dtype(dtype).itemsize > (3 << 30))


def _extratags(geotags: Mapping[int, Any]) -> list[tuple]:
    tags = []
    for code, tag in sorted(geotags.items()):
        if int(tag.dtype) == 2:  # ASCII: tifffile counts the terminating NUL itself
            tags.append((code, "s", 0, str(tag.value), True))
        else:
            vals = tuple(tag.value) if isinstance(tag.value, (tuple, list, np.ndarray)) else (tag.value,)
            tags.append((code, int(tag.dtype), len(vals), vals, True))
    return tags


# ------------------------------------------------------------------------------------ driver

@dataclass
class TiledReport:
    """What one :func:`predict_tiled` call did: output files per task, windows run (those on a
    strip boundary run once per strip), column strips, raster size."""

    files: dict[str, Path] = field(default_factory=dict)
    windows: int = 0
    strips: int = 1
    size: tuple[int, int] = (0, 0)
    seconds: float = 0.0


def strip_width(width: int, window: int, tile: int, out_channels: int, band_bytes: int) -> int:
    """Columns of one strip: the most (a multiple of ``tile``) whose blending band fits ``band_bytes``."""
    per_column = (tile + window) * max(1, out_channels) * 4
    cols = max(tile, band_bytes // per_column // tile * tile)
    return min(width, cols)


def memory_bound(width: int, window: int, tile: int, in_channels: int, out_channels: Mapping[str, int] | int,
                 batch_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES, in_itemsize: int = 4,
                 band_bytes: int = DEFAULT_BAND_BYTES) -> int:
    """Bytes :func:`predict_tiled` holds at most for a raster of ``width`` columns (any height, and
    any width past one strip: :func:`strip_width`), besides the model's own working memory for one
    batch: the blending band of a strip (float32, ``tile + window`` rows by the strip's width per
    output channel), the output tiles queued or in flight, one batch of windows in and out, the
    segment cache."""
    c_out = sum(out_channels.values()) if isinstance(out_channels, Mapping) else int(out_channels)
    band = c_out * (tile + window) * strip_width(width, window, tile, c_out, band_bytes) * 4
    tiles = (QUEUE_TILES + 3) * c_out * tile * tile * 4  # queued, being built, padded, being compressed
    batch = batch_size * window * window * (in_channels * (in_itemsize + 8) + c_out * 8)
    return band + tiles + batch + cache_bytes


def predict_tiled(run_fn: RunFn, src: str | os.PathLike | Mapping[str, str | os.PathLike], out_dir: str | os.PathLike,
                  *, window: int, overlap: int | None = None, batch_size: int = 8, tile: int = DEFAULT_TILE,
                  name: str | None = None, kinds: Mapping[str, str] | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                  band_bytes: int = DEFAULT_BAND_BYTES, compression: str | None = "zlib",
                  progress: bool = False) -> TiledReport:
    """Predict a large raster window by window into ``out_dir/<name>.<task>.tif``.

    ``run_fn`` maps a batch of windows (modality key -> (N, C, window, window) tensor: uint8 data
    as uint8, anything else as float32, raw values as stored in the file) to predictions (task ->
    (N, C', h, w), resized bilinearly to the window if ``h, w`` differ). ``src`` is one TIFF (its
    windows under the key ``"rgb"``) or a mapping modality key -> TIFF (all of one size). Windows
    of ``window`` pixels at the raster's own resolution overlap by ``overlap`` (default a quarter
    of the window); their predictions are blended with a linear ramp (:func:`ramp`). A raster
    smaller than a window is padded by repeating its edge. ``kinds[task]``: ``float32`` (default),
    ``float16``, or ``ids`` (the argmax over channels as uint8, uint16 past 256 channels). Output
    tiles are ``tile`` pixels (a multiple of 16); the input's georeferencing tags are copied.

    Memory (:func:`memory_bound`) is bounded whatever the raster's size: rows are blended in a band
    of ``tile + window`` rows, and a raster wider than ``band_bytes`` allows is done in column
    strips (windows on a strip boundary run for both strips; the result is the same), each written
    to a temporary tiled TIFF whose compressed tiles are then copied, row by row, into the output."""
    start = time.perf_counter()
    if window < 1 or batch_size < 1:
        raise ValueError(f"window and batch size must be >= 1, got {window}, {batch_size}")
    overlap = window // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < window:
        raise DataError(f"overlap {overlap}: expected 0 <= overlap < window ({window})")
    if tile < 16 or tile % 16:
        raise DataError(f"tile {tile}: expected a multiple of 16")
    kinds = dict(kinds or {})
    bad = {t: k for t, k in kinds.items() if k not in OUT_KINDS}
    if bad:
        raise DataError(f"output kinds {bad}: expected one of {OUT_KINDS}")
    srcs = {"rgb": src} if isinstance(src, (str, os.PathLike)) else dict(src)
    if not srcs:
        raise DataError("no input raster")
    name = name or Path(next(iter(srcs.values()))).stem
    out = Path(out_dir)
    readers: dict[str, TiffWindows] = {}
    parts: list[Path] = []
    try:
        for key, path in srcs.items():
            readers[key] = TiffWindows(path, cache_bytes // len(srcs))
        r0 = readers[next(iter(readers))]
        H, W = r0.height, r0.width
        for key, r in readers.items():
            if (r.height, r.width) != (H, W):
                raise DataError(f"{r.where}: {r.height}x{r.width}, but {r0.where} is {H}x{W}; paired rasters "
                                f"must share one pixel grid")
        geo = _extratags(r0.geotags)
        job = _Job(run_fn, readers, H, W, window, overlap, batch_size, tile, kinds, compression)
        channels = job.probe()
        missing = [t for t in kinds if t not in channels]
        if missing:
            raise DataError(f"kinds name tasks {missing} that run_fn does not return ({sorted(channels)})")
        sw = strip_width(W, window, tile, sum(channels.values()), band_bytes)
        strips = [(x, min(W, x + sw)) for x in range(0, W, sw)]
        report = TiledReport(size=(H, W), strips=len(strips))
        from tqdm.auto import tqdm

        with tqdm(total=len(job.ys) * len(job.xs), unit="win", desc=f"tiled {name}", disable=not progress,
                  dynamic_ncols=True) as bar:
            finals = {t: out / f"{name}.{t}.tif" for t in channels}
            if len(strips) == 1:
                report.windows = job.run_strip(0, W, finals, geo, bar)
            else:
                for i, (xa, xb) in enumerate(strips):
                    paths = {t: out / f"{name}.{t}.strip{i}.tif.part" for t in channels}
                    parts += paths.values()
                    report.windows += job.run_strip(xa, xb, paths, [], bar)
                for t, f in finals.items():
                    _merge([out / f"{name}.{t}.strip{i}.tif.part" for i in range(len(strips))], f, H, W,
                           job.out_channels(t), job.out_dtype(t), tile, geo, compression)
        report.files = finals
    finally:
        for r in readers.values():
            r.close()
        for p in parts:
            p.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report


class _Job:
    """One raster's windows: reads them, runs ``run_fn``, blends a band of rows of one column strip
    and hands finished tiles to writer threads."""

    def __init__(self, run_fn: RunFn, readers: dict[str, TiffWindows], H: int, W: int, window: int, overlap: int,
                 batch_size: int, tile: int, kinds: dict[str, str], compression: str | None) -> None:
        self.run_fn, self.readers, self.H, self.W = run_fn, readers, H, W
        self.window, self.batch_size, self.tile, self.kinds, self.compression = window, batch_size, tile, kinds, compression
        stride = window - overlap
        self.ys, self.xs = starts(H, window, stride), starts(W, window, stride)
        self.w1 = ramp(window, overlap)
        self.rsum, self.csum = weight_sum(H, window, overlap, stride), weight_sum(W, window, overlap, stride)
        self.channels: dict[str, int] = {}

    def out_channels(self, t: str) -> int:
        return 1 if self.kinds.get(t) == "ids" else self.channels[t]

    def out_dtype(self, t: str) -> np.dtype:
        kind = self.kinds.get(t, "float32")
        if kind == "ids":
            return np.dtype(np.uint8 if self.channels[t] <= 256 else np.uint16)
        return np.dtype(kind)

    def _run(self, y0: int, h: int, xb: Sequence[int]) -> dict[str, np.ndarray]:
        """Predictions (task -> (N, C, window, window) float32) of the windows at row ``y0``, columns ``xb``."""
        window, W = self.window, self.W
        batch = {}
        for key, r in self.readers.items():
            wins = []
            for x0 in xb:
                wdt = min(window, W - x0)
                a = r.read(y0, y0 + h, x0, x0 + wdt)
                if (h, wdt) != (window, window):
                    a = np.pad(a, ((0, 0), (0, window - h), (0, window - wdt)), mode="edge")
                wins.append(a)
            arr = np.stack(wins)
            del wins
            batch[key] = torch.from_numpy(arr if arr.dtype == np.uint8 else arr.astype(np.float32))
        preds = self.run_fn(batch)
        del batch
        res = {}
        for t, p in preds.items():
            p = p.detach().float().cpu()
            if p.ndim != 4 or p.shape[0] != len(xb):
                raise DataError(f"task {t}: run_fn returned shape {tuple(p.shape)}; expected ({len(xb)}, C, h, w)")
            if p.shape[-2:] != (window, window):
                p = F.interpolate(p, size=(window, window), mode="bilinear", align_corners=False)
            if self.channels and self.channels.get(t) != p.shape[1]:
                raise DataError(f"task {t}: run_fn returned {p.shape[1]} channels, {self.channels.get(t)} before "
                                f"(tasks {sorted(self.channels)})")
            res[t] = p.numpy()
        if self.channels and set(res) != set(self.channels):
            raise DataError(f"run_fn returned tasks {sorted(res)}, {sorted(self.channels)} before")
        return res

    def probe(self) -> dict[str, int]:
        """The tasks and channels ``run_fn`` returns (from the first window)."""
        preds = self._run(0, min(self.window, self.H), self.xs[:1])
        self.channels = {t: int(p.shape[1]) for t, p in preds.items()}
        if not self.channels:
            raise DataError("run_fn returned no prediction")
        return self.channels

    def run_strip(self, xa: int, xb: int, paths: dict[str, Path], geo: list[tuple], bar: Any) -> int:
        """Blend and write columns ``xa:xb`` of every output; returns the windows run."""
        H, window, tile, w1 = self.H, self.window, self.tile, self.w1
        Ws = xb - xa
        cap = tile + window
        xs = [x for x in self.xs if x < xb and x + window > xa]
        acc = {t: np.zeros((c, cap, Ws), np.float32) for t, c in self.channels.items()}
        csum = self.csum[xa:xb]
        writers: dict[str, _TileWriter] = {}
        ok = False
        emitted = 0  # rows [0, emitted) are written; acc row 0 is image row ``emitted``
        runs = 0
        try:
            for t, p in paths.items():
                writers[t] = _TileWriter(p, H, Ws, self.out_channels(t), self.out_dtype(t), tile, geo,
                                         self.compression)
            for k, y0 in enumerate(self.ys):
                h = min(window, H - y0)
                for b in range(0, len(xs), self.batch_size):
                    xb_ = xs[b:b + self.batch_size]
                    preds = self._run(y0, h, xb_)
                    for t, pn in preds.items():
                        a = acc[t]
                        for i, x0 in enumerate(xb_):
                            lo, hi = max(x0, xa), min(x0 + window, xb, self.W)  # columns of the window in the strip
                            wgt = w1[:h, None] * w1[None, lo - x0:hi - x0]
                            a[:, y0 - emitted:y0 - emitted + h, lo - xa:hi - xa] += pn[i, :, :h, lo - x0:hi - x0] * wgt
                    del preds
                    runs += len(xb_)
                    bar.update(len(xb_) * (xb - xa) / self.W)
                upto = self.ys[k + 1] if k + 1 < len(self.ys) else H
                while emitted < H and (emitted + tile <= upto or upto >= H):  # rows no later window touches
                    h = min(tile, H - emitted)
                    norm = self.rsum[emitted:emitted + h, None] * csum[None, :]
                    for t, a in acc.items():
                        kind = self.kinds.get(t, "float32")
                        for x0 in range(0, Ws, tile):  # tile by tile: no full-width copy of the row
                            v = a[:, :h, x0:x0 + tile] / norm[:, x0:x0 + tile]
                            v = v.argmax(0).astype(self.out_dtype(t))[None] if kind == "ids" else v.astype(kind, copy=False)
                            if v.shape[1:] != (tile, tile):
                                v = np.pad(v, ((0, 0), (0, tile - v.shape[1]), (0, tile - v.shape[2])))
                            writers[t].put(np.ascontiguousarray(np.moveaxis(v, 0, -1)) if v.shape[0] > 1 else v[0])
                        for i in range(0, cap - h, h):  # shift the band up by h rows, chunks that never overlap
                            n = min(h, cap - h - i)
                            a[:, i:i + n] = a[:, i + h:i + h + n]
                        a[:, cap - h:] = 0
                    emitted += h
            ok = True
        finally:
            first_err: BaseException | None = None
            for wr in writers.values():
                try:
                    wr.close(ok)
                except BaseException as e:  # keep closing the others, then report the first
                    first_err = first_err or e
            if first_err is not None and ok:
                raise first_err
        return runs


def _merge(parts: Sequence[Path], out: Path, H: int, W: int, channels: int, dtype: np.dtype, tile: int,
           extratags: list[tuple], compression: str | None) -> None:
    """Column strips (tiled TIFFs of the same tile size, each starting on a tile column) -> one tiled
    TIFF, copying each compressed tile as it is, in row-major order."""
    import tifffile

    tifs = [tifffile.TiffFile(p) for p in parts]
    try:
        def tiles() -> Iterator[bytes]:
            for r in range(math.ceil(H / tile)):
                for t in tifs:
                    page, fh = t.pages.first, t.filehandle
                    n = math.ceil(page.imagewidth / tile)
                    for c in range(n):
                        fh.seek(page.dataoffsets[r * n + c])
                        yield fh.read(page.databytecounts[r * n + c])

        tmp = out.with_name(out.name + ".part")
        try:
            tifffile.imwrite(tmp, tiles(), **_tiff_kwargs(H, W, channels, dtype, tile, extratags, compression))
            commit(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        for t in tifs:
            t.close()


# ------------------------------------------------------------------------------- multimae predict

def predictor_run_fn(predictor: Any) -> RunFn:
    """A :class:`multimae.apps.predict.Predictor` as a ``run_fn``: each window goes through the run's
    evaluation preprocessing (the same as an image of the model's size given to ``predict``)."""

    def run(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        n = len(next(iter(batch.values())))
        raws = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        preds = predictor.predict_lowres(raws)
        # a window's prediction maps onto it by a plain resize (up == size): left to predict_tiled,
        # which resizes the whole batch at once (the same bilinear rule as LowRes)
        return {t: torch.stack([p[t].p if p[t].up == p[t].size else p[t].full() for p in preds]) for t in preds[0]}

    return run


def _tiff_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TIFF_EXTS)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p}: no such file or folder")
    if not files:
        raise DataError(f"input {', '.join(map(str, inputs))}: no .tif / .tiff raster")
    return files


def _input_prep(spec: Any, reader: TiffWindows) -> Callable[[Tensor], Tensor] | None:
    """Check that the raster can feed ``spec``; for a raster modality (``spec.is_raster``: bands /
    nodata declared on the spec, :mod:`multimae.data.rasters`), the function that keeps its bands
    and turns nodata into NaN (invalid pixels), as the training data was read."""
    if getattr(spec, "is_raster", False):
        from multimae.data.rasters import band_indices, file_band_names, nodata_invalid

        idx = band_indices(spec, reader.channels, file_band_names(reader.tiff, reader.channels), reader.where)
        where = reader.where

        def prep(x: Tensor) -> Tensor:
            a = x.numpy()[:, idx]
            invalid = nodata_invalid(a, spec, where)
            a = a.astype(np.float32)
            if invalid is not None:
                a[invalid] = np.nan
            return torch.from_numpy(a)

        return prep
    if reader.channels != spec.channels:
        raise DataError(f"{reader.where}: {reader.channels} bands, but input {spec.name!r} takes {spec.channels}")
    if spec.kind == "image" and reader.dtype != np.uint8:
        raise DataError(f"{reader.where}: {reader.dtype} samples, but input {spec.name!r} is an 8-bit image "
                        f"modality")
    return None


def predict_tiled_files(predictor: Any, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        overlap: int | None = None, batch_size: int = 8, tile: int = DEFAULT_TILE,
                        arrays: str = "auto", pairs: Mapping[str, str | os.PathLike] | None = None,
                        progress: bool = True) -> dict[str, int]:
    """``multimae predict --tiled``: every TIFF of ``inputs`` (files or folders) through
    :func:`predict_tiled` with the predictor's windows (its image size) into
    ``OUT/<name>.<task>.tif`` (segmentation: class ids; depth: float32; other dense outputs:
    ``arrays``' dtype, float16 for ``auto`` / ``none``). Extra input modalities come from
    ``pairs[name]/<stem>.tif``. Resumable (finished rasters are skipped); a bad raster is reported,
    skipped and counted. Returns the counts."""
    from multimae.apps.predict_io import check_identity, output_names, run_identity

    if predictor.window:
        raise DataError("--tiled and --window are two ways of sliding windows: give one")
    if any(o.kind == "classification" for o in predictor.outputs.values()):
        raise DataError("--tiled applies to dense predictions, not a classification run")
    dense = arrays if arrays in ("float16", "float32") else "float16"
    kinds = {t: "ids" if o.kind == "segmentation" else "float32" if o.kind == "depth" else dense
             for t, o in predictor.outputs.items()}
    window = predictor.image_size
    overlap = window // 4 if overlap is None else overlap
    root = Path(out)
    identity = run_identity(predictor, tiled={"window": window, "overlap": overlap}, kinds=kinds)
    meta_path = root / "multimae_predict.json"
    check_identity(meta_path, identity)
    files = _tiff_inputs(inputs)
    counts = {"predicted": 0, "already_done": 0, "bad": 0}
    meta = {"run": predictor.run, "identity": identity, "inputs": identity["inputs"], "preprocessing": "tiled",
            "tasks": {t: {"kind": o.kind, "file": f"<name>.{t}.tif", "values": kinds[t],
                          **({"classes": o.classes} if o.classes else {})} for t, o in predictor.outputs.items()},
            "counts": counts}

    def save_meta() -> None:  # whole or not at all
        save_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())

    root.mkdir(parents=True, exist_ok=True)
    save_meta()
    run_fn = predictor_run_fn(predictor)
    spec0, extra = predictor.inputs[0], predictor.inputs[1:]
    for name, f in zip(output_names(files), files):
        if all((root / f"{name}.{t}.tif").is_file() for t in kinds):
            counts["already_done"] += 1
            continue
        try:
            srcs = {spec0.key: f}
            for sp in extra:
                if sp.name not in (pairs or {}):
                    raise DataError(f"raster {f}: input {sp.name!r} needs a paired directory (--pair {sp.name}=DIR)")
                pdir = Path(pairs[sp.name])
                pf = next((c for e in TIFF_EXTS if (c := pdir / f"{Path(name).name}{e}").is_file()), None)
                if pf is None:
                    raise DataError(f"raster {f}: no paired {sp.name} raster {pdir / Path(name).name}.tif")
                srcs[sp.key] = pf
            preps = {}
            for sp in predictor.inputs:
                with TiffWindows(srcs[sp.key]) as r:
                    if (prep := _input_prep(sp, r)) is not None:
                        preps[sp.key] = prep
            predict_tiled(lambda b, preps=preps: run_fn({k: preps[k](v) if k in preps else v for k, v in b.items()}),
                          srcs, root, window=window, overlap=overlap, batch_size=batch_size, tile=tile, name=name,
                          kinds=kinds, progress=progress)
            counts["predicted"] += 1
        except DataError as e:
            counts["bad"] += 1
            print(f"skipped: {e}", flush=True)
        save_meta()
    return counts
