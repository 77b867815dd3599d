"""Per-band statistics of raster modalities (``multimae data stats``), kept in ``multimae_data.json``.

:func:`compute_stats` streams a folder dataset's files one at a time (memory: one sample plus an
8 MiB float64 chunk, whatever the dataset size) and accumulates, per band, the count, mean and sum
of squared deviations of the valid values (nodata and NaN / inf excluded) in float64, merging
chunk by chunk with Chan et al.'s pairwise update (no catastrophic cancellation of a sum of
squares). :func:`write_stats`
records them under ``band_stats`` in ``root/multimae_data.json``::

    "band_stats": {"s2": {"split": "train", "files": 120, "bands": ["B04", "B03", "B08"],
                          "nodata": 0, "mean": [...], "std": [...], "count": [...]}}

:func:`fill_band_stats` gives a run's raster specs without ``mean`` / ``std`` those statistics
(pretraining does it when it completes its config), so they are saved in the run's model config,
every checkpoint and exported file, and predict / export / demo normalise the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from multimae.data.errors import DataError
from multimae.data.rasters import same_nodata
from multimae.core.modalities import ModalitySpec

STATS_KEY = "band_stats"


class BandStats:
    """Streaming per-band count / mean / M2 (float64) of (C,H,W) values; NaN / inf ignored."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels, dtype=np.int64)
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    #: values converted to float64 at a time (8 MiB), whatever the raster's size
    CHUNK = 1 << 20

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        a = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        a = a.reshape(a.shape[0], -1)
        for c in range(a.shape[0]):
            for start in range(0, a.shape[1], self.CHUNK):
                v = a[c, start:start + self.CHUNK].astype(np.float64)
                self._merge(c, v[np.isfinite(v)])

    def _merge(self, c: int, v: np.ndarray) -> None:
        """Chan et al.'s pairwise update of band ``c`` with the values ``v``."""
        n = v.size
        if n == 0:
            return
        m = float(v.mean())
        m2 = float(np.square(v - m).sum())
        tot = self.count[c] + n
        delta = m - self.mean[c]
        self.mean[c] += delta * n / tot
        self.m2[c] += m2 + delta * delta * self.count[c] * n / tot
        self.count[c] = tot

    def std(self) -> np.ndarray:
        """Population standard deviation per band (0 where a band has no valid value)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


def compute_stats(root: str | os.PathLike, split: str, specs: Sequence[ModalitySpec], limit: int | None = None,
                  on_error: str = "raise", progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Per-band statistics of the raster modalities ``specs`` over ``root/split`` (at most
    ``limit`` samples, in index order). Returns ``{name: {"mean", "std", "count", ...}}``."""
    from multimae.data.folder import FolderDataset

    rasters = [s for s in specs if s.is_raster]
    if not rasters:
        raise ValueError(f"no raster modality among {[s.name for s in specs]}: declare one with "
                         "bands / band_names / nodata (kind dense)")
    ds = FolderDataset(root, split, rasters, on_error=on_error, label_from_class_dir=False)
    acc = {s.key: BandStats(s.channels) for s in rasters}
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        try:
            sample = ds.load(i)
        except DataError:
            if on_error == "raise":
                raise
            continue
        for key, a in acc.items():
            a.update(sample[key])
        if progress is not None:
            progress(i + 1, n)
    out = {}
    for s in rasters:
        a = acc[s.key]
        empty = [i for i, c in enumerate(a.count) if c == 0]
        if empty:
            raise DataError(f"{Path(root) / split / s.key}: modality {s.name!r} band(s) {empty} have no valid pixel "
                            f"in {n} file(s) (every value nodata={s.nodata!r} or NaN)")
        std = a.std()
        out[s.name] = {"split": split, "files": n, "bands": list(s.bands) or list(s.band_names) or None,
                       "nodata": s.nodata, "mean": [float(v) for v in a.mean],
                       "std": [float(v) if v > 0 else 1.0 for v in std],  # a constant band: not scaled
                       "count": [int(c) for c in a.count]}
    return out


def write_stats(root: str | os.PathLike, stats: dict[str, dict]) -> dict:
    """Merge ``stats`` into ``root/multimae_data.json``'s ``band_stats`` (atomic write)."""
    from multimae.data.prepare.writing import update_meta

    return update_meta(Path(root), lambda meta: meta.setdefault(STATS_KEY, {}).update(stats))


def read_stats(root: str | os.PathLike, spec: ModalitySpec) -> dict | None:
    """The recorded statistics of ``spec`` in ``root/multimae_data.json`` (None if none), checked
    to be of the same bands and nodata: other ones are a DataError saying to recompute them."""
    from multimae.data.folder import META_FILE, read_meta

    rec = read_meta(root).get(STATS_KEY, {}).get(spec.name)
    if rec is None:
        return None
    where = f"{Path(root) / META_FILE}: {STATS_KEY}.{spec.name}"
    bands = list(spec.bands) or list(spec.band_names) or None
    if rec.get("bands") != bands or not same_nodata(rec.get("nodata"), spec.nodata) \
            or len(rec.get("mean", ())) != spec.channels:
        raise DataError(f"{where} was computed for bands {rec.get('bands')} nodata {rec.get('nodata')!r} "
                        f"({len(rec.get('mean', ()))} values), the modality keeps bands {bands} nodata {spec.nodata!r} "
                        f"({spec.channels} channels): run `multimae data stats` again")
    return rec


def fill_band_stats(root: str | os.PathLike, modalities: dict[str, dict], specs: Sequence[ModalitySpec]) -> dict[str, dict]:
    """``modalities`` (a ModelConfig's overrides) with ``mean`` / ``std`` from ``root``'s
    recorded statistics for every raster spec that has none (a copy). A raster without either
    is a DataError naming the command that computes them."""
    out = dict(modalities)
    for spec in specs:
        if not spec.is_raster or spec.mean is not None:
            continue
        rec = read_stats(root, spec)
        if rec is None:
            raise DataError(f"{Path(root)}: raster modality {spec.name!r} has no mean / std: compute them with "
                            f"`multimae data stats --root {root} --modality '<its spec as JSON>'` (or set "
                            f"model.modalities.{spec.name}.mean / std)")
        out[spec.name] = {**out.get(spec.name, {}), "mean": list(rec["mean"]), "std": list(rec["std"])}
    return out
