"""The labelling loop: read images, run the labellers in batches, write the official folder layout
(or shards), resumably and atomically.

Folder output: ``out/<split>/rgb/<class>/<name>.<ext>`` (the input file's bytes, unchanged, when it
is a common image format), ``out/<split>/depth/<class>/<name>.png`` (16-bit) and
``out/<split>/semseg/<class>/<name>.png`` (8-bit ids, 16-bit when there are more than 256 classes).
``out/multimae_data.json`` records the depth PNG scale (read back by
:class:`~multimae.data.folder.FolderDataset`) and, under ``pseudolabel``, the labellers and the
class names (also in ``out/semseg_classes.txt``, one name per line, line i = id i).

Depth: a metric labeller is stored in millimetres (``png_scale`` 0.001, up to 65.535 m; values
<= 0 become 0 = invalid). A relative one (affine-invariant depth or disparity) is stored per image
as ``1 + 65534 * (d - min) / (max - min)`` with ``png_scale`` 1/65535, so every pixel is valid; the
robust standardisation used in pre-training removes any per-image scale and shift anyway.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from multimae.data.codecs import IMAGE_EXTS, decode_image, encode_field, encode_png16
from multimae.data.errors import DataError, ErrorPolicy
from multimae.data.folder import META_FILE
from multimae.data.prepare.writing import METRIC_PNG_SCALE, metric_depth_mm, update_meta, write_bytes
from multimae.apps.pseudolabel.labelers import Labeler, MultiMAELabeler, is_multimae_checkpoint, load_labeler
from multimae.apps.inference import Counts, InputItem, open_input, run_batches

log = logging.getLogger("multimae.apps.pseudolabel")

RELATIVE_PNG_SCALE = 1.0 / 65535
CLASSES_FILE = "semseg_classes.txt"


@dataclass
class PseudolabelReport(Counts):
    """What a run did (:class:`~multimae.apps.inference.Counts`) and the files it wrote."""

    outputs: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return self.processed

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"labelled {self.labelled} image(s) in {self.seconds:.1f} s ({self.images_per_second:.2f} img/s); "
                f"{self.already_done} already done, {self.bad} bad input(s) skipped")


# --- encoding ------------------------------------------------------------------------------------


def encode_depth(depth: Tensor, units: str) -> tuple[np.ndarray, float]:
    """float (1,H,W) -> (uint16 (H,W), png_scale); see the module doc for both encodings."""
    d = depth[0].double()
    bad = ~torch.isfinite(d)
    if units == "metric":
        return metric_depth_mm(d.numpy()), METRIC_PNG_SCALE
    good = d[~bad]
    if good.numel() == 0:
        return np.zeros(tuple(d.shape), np.uint16), RELATIVE_PNG_SCALE
    lo, hi = float(good.min()), float(good.max())
    q = torch.ones_like(d) if hi <= lo else 1 + (d - lo) / (hi - lo) * 65534
    q = torch.where(bad, 0.0, q.round().clamp(1, 65535))
    return q.numpy().astype(np.uint16), RELATIVE_PNG_SCALE


def encode_classes(ids: Tensor, num_classes: int, where: str) -> bytes:
    """int (H,W) class ids -> PNG bytes: 8-bit when the label set has at most 256 classes, else 16-bit."""
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or (num_classes and int(ids.max()) >= num_classes)):
        raise ValueError(f"{where}: class ids [{int(ids.min())}, {int(ids.max())}] outside [0, {num_classes})")
    if num_classes > 256:
        return encode_png16(ids.numpy().astype(np.uint16))
    return encode_field(ids, "semseg", where=where)[1]


_write_bytes = write_bytes  # atomic (temporary name, fsync, rename), shared with `multimae data prepare`


def _rgb_file(item: InputItem, data: bytes, rgb: Tensor) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a sample's rgb: the input file as it is in a common image format, else a PNG."""
    return (item.ext, data) if item.ext in IMAGE_EXTS else encode_field(rgb, "rgb", "png")


# --- outputs -------------------------------------------------------------------------------------


class FolderWriter:
    """Writes the official folder layout; a sample is done when its rgb and every task file exist."""

    def __init__(self, root: Path, split: str, tasks: Sequence[str]) -> None:
        self.root, self.split, self.tasks = Path(root), split, tuple(tasks)

    def _path(self, key: str, cls: str, name: str, ext: str) -> Path:
        return self.root / self.split / key / cls / f"{name}.{ext}"

    def done(self, item: InputItem) -> bool:
        if not all(self._path(t, item.cls, item.name, "png").is_file() for t in self.tasks):
            return False
        return any(self._path("rgb", item.cls, item.name, e).is_file() for e in IMAGE_EXTS)

    def write(self, item: InputItem, data: bytes, rgb: Tensor, maps: dict[str, bytes]) -> None:
        for task, png in maps.items():
            _write_bytes(self._path(task, item.cls, item.name, "png"), png)
        ext, raw = _rgb_file(item, data, rgb)
        _write_bytes(self._path("rgb", item.cls, item.name, ext), raw)

    def close(self) -> list[str]:
        return [str(self.root / self.split)]


class ShardWriter:
    """Writes WebDataset shards (``out/<split>-%06d.tar``) through :func:`multimae.data.shards.write_shards`;
    not resumable: existing shards of the split are refused."""

    def __init__(self, root: Path, split: str, shard_size: int, depth_scale: float | None) -> None:
        import queue
        import threading

        from multimae.data.shards import write_shards

        self.pattern = str(Path(root) / f"{split}-%06d.tar")
        if Path(self.pattern % 0).exists():
            raise DataError(f"{self.pattern % 0}: exists; shard output does not resume, remove the shards first")
        self.depth_scale = depth_scale or RELATIVE_PNG_SCALE
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.paths: list[str] = []
        self.error: BaseException | None = None

        def stream() -> Iterator[dict]:
            while (s := self.queue.get()) is not None:
                yield s

        def work() -> None:
            try:
                self.paths = write_shards(stream(), self.pattern, shard_size, png_scale=self.depth_scale)
            except BaseException as e:  # re-raised in close()
                self.error = e
                while self.queue.get() is not None:
                    pass

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def done(self, item: InputItem) -> bool:
        return False

    def write(self, item: InputItem, data: bytes, rgb: Tensor, maps: dict[str, bytes]) -> None:
        ext, raw = _rgb_file(item, data, rgb)
        sample: dict = {"__key__": item.name, f"rgb.{ext}": raw, **{f"{t}.png": png for t, png in maps.items()}}
        if "depth" in maps:
            sample["__png_scale__"] = {"depth": self.depth_scale}
        self.queue.put(sample)

    def close(self) -> list[str]:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.paths


# --- metadata ------------------------------------------------------------------------------------


def _record_meta(root: Path, info: dict, depth_scale: float | None, fmt: str) -> None:
    """Merge this run's facts into ``root/multimae_data.json`` (atomic); refuses a conflicting re-run."""
    def update(meta: dict) -> None:
        old = meta.get("pseudolabel", {})
        for task, facts in info.items():
            prev = old.get(task) or {}
            for k in ("labeler", "model", "units", "label_set", "num_classes", "classes"):
                known = (k in prev or k in facts) if k in ("labeler", "model") else (k in prev and k in facts)
                if prev and known and prev.get(k) != facts.get(k):
                    raise DataError(f"{root / META_FILE}: {task} was labelled with {k}={prev.get(k)!r}, this run gives "
                                    f"{facts.get(k)!r}; use another --out")
        meta["pseudolabel"] = {**old, **info}
        if depth_scale is not None:
            meta["png_scale"] = {**meta.get("png_scale", {}), "depth": depth_scale}

    update_meta(root, update, fmt)
    if "semseg" in info and "classes" in info["semseg"]:
        _write_bytes(root / CLASSES_FILE, ("\n".join(info["semseg"]["classes"]) + "\n").encode())


# --- the loop ------------------------------------------------------------------------------------


def build_labelers(depth: str | os.PathLike | None, semseg: str | os.PathLike | None, device: str = "auto",
                   precision: str = "auto", **options) -> list[Labeler]:
    """Labellers for the requested tasks; one MultiMAE checkpoint given for both is loaded once."""
    if depth is None and semseg is None:
        raise ValueError("nothing to label: give a depth and/or a semseg labeller")
    if depth is not None and semseg is not None and Path(depth).resolve() == Path(semseg).resolve() \
            and is_multimae_checkpoint(depth):
        return [MultiMAELabeler(depth, ("depth", "semseg"), device, precision, options.get("image_size"))]
    return [load_labeler(path, task, device, precision, **options)
            for task, path in (("depth", depth), ("semseg", semseg)) if path is not None]


def pseudolabel(input: str | os.PathLike, out: str | os.PathLike, labelers: Sequence[Labeler], split: str = "train",
                batch_size: int = 8, on_error: str = "skip", fmt: str = "folder", shard_size: int = 1000,
                progress: bool = True, limit: int | None = None) -> PseudolabelReport:
    """Label every image of ``input`` with ``labelers`` and write ``out`` (see the module doc).

    on_error: ``skip`` a corrupt / unreadable image (logged, counted in ``report.bad``) or ``raise``.
    limit: stop after this many input images (done ones included). Returns a :class:`PseudolabelReport`.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if fmt not in ("folder", "shards"):
        raise ValueError(f"format must be folder or shards, got {fmt!r}")
    policy = ErrorPolicy(on_error)
    tasks = [t for lab in labelers for t in lab.tasks]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two labellers produce the same task: {tasks}")
    info = {k: v for lab in labelers for k, v in lab.info().items()}
    units = info.get("depth", {}).get("units")
    num_classes = {t: int(v.get("num_classes", 0)) for t, v in info.items()}
    depth_scale = None if units is None else (METRIC_PNG_SCALE if units == "metric" else RELATIVE_PNG_SCALE)
    root = Path(out)
    kind, items, total = open_input(input)
    if limit is not None:
        items = (it for i, it in zip(range(limit), items))
        total = min(total, limit) if total is not None else limit
    _record_meta(root, info, depth_scale, fmt)
    writer = FolderWriter(root, split, tasks) if fmt == "folder" else ShardWriter(root, split, shard_size, depth_scale)

    def decode(it: InputItem) -> tuple[bytes, Tensor]:
        data = it.read()
        return data, decode_image(data, 3, f"image {it.where}")

    def process(batch: Sequence[tuple[InputItem, str, tuple[bytes, Tensor]]]) -> None:
        images = [img for _, _, (_, img) in batch]
        maps: dict[str, list[Tensor]] = {}
        for lab in labelers:
            maps.update(lab(images))
        for i, (it, _, (data, img)) in enumerate(batch):
            encoded = {}
            for task in tasks:
                m = maps[task][i]
                if tuple(m.shape[-2:]) != tuple(img.shape[-2:]):
                    raise RuntimeError(f"labeller returned {task} of size {tuple(m.shape[-2:])} for image "
                                       f"{it.where} of size {tuple(img.shape[-2:])}")
                encoded[task] = (encode_png16(encode_depth(m, units)[0]) if task == "depth"
                                 else encode_classes(m, num_classes.get(task, 0), f"{task} of {it.where}"))
            writer.write(it, data, img, encoded)

    report = PseudolabelReport()
    try:
        run_batches(items, total, name=lambda it: it.key, done=lambda it, _: writer.done(it), decode=decode,
                    process=process, on_bad=policy.handle, batch_size=batch_size, desc="pseudolabel",
                    progress=progress, counts=report)
    finally:
        report.outputs = writer.close()
    if report.bad:
        log.warning("%s", policy.summary(str(input)))
    return report
