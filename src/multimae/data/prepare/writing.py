"""Shared writing of prepared datasets (and of ``multimae pseudolabel``): atomic files, the folder
layout or WebDataset shards, resume, ``multimae_data.json`` and the closing line.

A dataset module turns its download into a list of :class:`Item`\\ s (one per output sample, in a
fixed order) and :func:`write_items` writes them:

* folder: ``root/<split>/<key>/<class>/<name>.<ext>``; a sample whose files all exist is skipped
  (resume), every file is written atomically (temporary name, fsync, rename);
* shards: ``root/<split>-%06d.tar`` of ``shard_size`` samples each, in item order; a shard that
  exists with the expected number of samples is skipped (resume), the others are (re)written,
  each to a temporary name renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from multimae.core.io import save_bytes_atomic, save_file_atomic, tmp_name
from multimae.data.errors import DataError
from multimae.data.folder import META_FILE, read_meta

METRIC_PNG_SCALE = 1e-3  # depth in millimetres: up to 65.535 m
LINK_MODES = ("copy", "hardlink", "symlink")


write_bytes = save_bytes_atomic  # one file, atomically (temporary name, fsync, rename: multimae.core.io)


def place_file(src: Path, dst: Path, mode: str = "copy") -> None:
    """Put ``src`` at ``dst`` atomically: a byte copy, a hard link or a symbolic link."""
    if mode not in LINK_MODES:
        raise ValueError(f"link mode must be one of {LINK_MODES}, got {mode!r}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(tmp_name(dst.name))  # a link's: its target's mode and data are not ours to change
    try:
        if mode == "copy":
            save_file_atomic(dst, lambda t: shutil.copyfile(src, t))
            return
        if mode == "hardlink":
            os.link(src, tmp)
        else:
            os.symlink(os.path.abspath(src), tmp)
        os.replace(tmp, dst)
    except FileNotFoundError:
        raise DataError(f"{src}: not found") from None
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def contained(root: Path, name: str, where: str) -> Path:
    """``root / name`` for a relative path ``name`` that a dataset's index file gives, refused
    (:class:`DataError` naming ``where``) when it could leave ``root``: absolute, with ``..``, or
    resolving (through symbolic links) outside ``root``."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise DataError(f"{where}: file name {name!r} must be a path inside {root} (no absolute path, no '..')")
    path = root / pure
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{where}: {path} resolves to {path.resolve()}, outside {root} (a symbolic link?)")
    return path


def check_image_file(path: Path, where: str) -> Path:
    """``path`` after checking that its bytes decode as an image within the pixel limit
    (JPEGs decoded at 1/8 scale: cheap, the whole entropy stream is still read); DataError
    naming ``where`` otherwise. Returns ``path`` (to copy or link unchanged)."""
    from multimae.data.codecs import IMAGE_EXTS, open_image

    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: {path} unreadable ({e.strerror or e})") from None
    img = open_image(data, f"{where}: {path}", draft=(1, 1))
    if (img.format or "").lower() not in IMAGE_EXTS + ("jpeg", "mpo"):
        raise DataError(f"{where}: {path} is a {img.format} image; expected one of {', '.join(IMAGE_EXTS)}")
    return path


def check_unique(items: Sequence["Item"], fmt: str) -> None:
    """Refuse two items written to the same output (one would silently replace the other)."""
    seen: dict[tuple[str, ...], str] = {}
    for it in items:
        key = (it.split, it.cls, it.name) if fmt == "folder" else (it.split, it.name)
        if key in seen:
            raise DataError(f"{it.where or it.name} and {seen[key] or it.name} would both be written as sample "
                            f"{'/'.join(key)}: rename one of them")
        seen[key] = it.where


def metric_depth_mm(depth: np.ndarray) -> np.ndarray:
    """Depth in metres (H,W) -> uint16 millimetres (:data:`METRIC_PNG_SCALE`); values <= 0 and
    non-finite ones become 0 (invalid), valid ones at least 1 mm, at most 65.535 m."""
    d = np.asarray(depth, dtype=np.float64)
    bad = ~np.isfinite(d) | (d <= 0)
    q = np.clip(np.rint(np.where(bad, 0.0, d) / METRIC_PNG_SCALE), 1, 65535)
    return np.where(bad, 0, q).astype(np.uint16)


def update_meta(root: Path, update: Callable[[dict], None], fmt: str = "folder") -> dict:
    """Read ``root/multimae_data.json`` (folder output; shards start from {}), apply ``update`` to
    it in place, and write it back atomically. Returns the new metadata."""
    meta = read_meta(root) if fmt == "folder" else {}
    update(meta)
    meta.update(format="multimae-folder" if fmt == "folder" else "multimae-shards", version=1)
    root.mkdir(parents=True, exist_ok=True)
    write_bytes(root / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


@dataclass(slots=True)  # ImageNet lists 1.3M of them
class Item:
    """One output sample: ``split``, ``cls`` (class directory, ``all`` when unlabelled), ``name``,
    the output extension of each key, and ``make()`` giving each key's bytes (or a source file to
    copy / link). ``label``: the class index written into shards; ``where``: for messages."""

    split: str
    cls: str
    name: str
    exts: Mapping[str, str]
    make: Callable[[], Mapping[str, bytes | Path]]
    where: str = ""
    label: int | None = None


@dataclass
class WriteReport:
    written: int = 0
    done_before: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"wrote {self.written} sample(s), {self.done_before} already done (resumed)"


def _folder_paths(root: Path, it: Item) -> dict[str, Path]:
    return {k: root / it.split / k / it.cls / f"{it.name}.{ext}" for k, ext in it.exts.items()}


def _bytes_of(value: bytes | Path) -> bytes:
    if isinstance(value, Path):
        try:
            return value.read_bytes()
        except OSError as e:
            raise DataError(f"{value}: unreadable ({e})") from None
    return value


def _shard_samples(items: Sequence[Item], png_scale: Mapping[str, float], bar) -> Iterator[dict]:
    import torch

    for it in items:
        data = it.make()
        sample: dict = {"__key__": it.name}
        for k, ext in it.exts.items():
            sample[f"{k}.{ext}"] = _bytes_of(data[k])
        scales = {k: v for k, v in png_scale.items() if k in it.exts}
        if scales:
            sample["__png_scale__"] = scales
        if it.label is not None:
            sample["label"] = torch.tensor(int(it.label))
        yield sample
        bar.update(1)


def write_items(items: Sequence[Item], root: str | os.PathLike, fmt: str = "folder", *, shard_size: int = 1000,
                png_scale: Mapping[str, float] | None = None, link: str = "copy", progress: bool = True,
                desc: str = "prepare") -> WriteReport:
    """Write ``items`` (see the module doc); resumes a partly written output."""
    from tqdm.auto import tqdm

    if fmt not in ("folder", "shards"):
        raise ValueError(f"format must be folder or shards, got {fmt!r}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    root = Path(root)
    check_unique(items, fmt)
    report = WriteReport(per_split=dict(Counter(it.split for it in items)))
    bar = tqdm(total=len(items), unit="sample", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        if fmt == "folder":
            for it in items:
                paths = _folder_paths(root, it)
                if all(p.is_file() for p in paths.values()):
                    report.done_before += 1
                else:
                    data = it.make()
                    for k, p in paths.items():
                        if isinstance(data[k], Path):
                            place_file(data[k], p, link)
                        else:
                            write_bytes(p, data[k])
                    report.written += 1
                bar.update(1)
            report.outputs = [str(root / s) for s in report.per_split]
            return report
        from multimae.data.shards import count_samples, write_shards

        for split in report.per_split:
            mine = [it for it in items if it.split == split]
            pattern = str(root / f"{split}-%06d.tar")
            for i, start in enumerate(range(0, len(mine), shard_size)):
                chunk = mine[start:start + shard_size]
                path = pattern % i
                if os.path.exists(path) and count_samples([path]) == len(chunk):
                    report.done_before += len(chunk)
                    bar.update(len(chunk))
                else:
                    write_shards(_shard_samples(chunk, png_scale or {}, bar), pattern, shard_size, first=i)
                    report.written += len(chunk)
                report.outputs.append(path)
        return report
    finally:
        bar.close()



def closing_line(dataset: str, counts: Mapping[str, int], known: Mapping[str, int], limit: int | None,
                 unit: str = "samples") -> str:
    """One line comparing the written split sizes with the dataset's known ones."""
    parts = []
    for split, n in counts.items():
        k = known.get(split)
        if limit is not None:
            parts.append(f"{split} {n}" + (f" of {k}" if k else ""))
        elif k is None:
            parts.append(f"{split} {n}")
        elif n == k:
            parts.append(f"{split} {n} (= the known size)")
        else:
            parts.append(f"{split} {n} (the known size is {k}: {'missing' if n < k else 'extra'} {abs(n - k)})")
    tail = f"; a --limit {limit} subset" if limit is not None else ""
    return f"{dataset}: {', '.join(parts)} {unit}{tail}"
