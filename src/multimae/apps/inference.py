"""The batched-inference pipeline of ``multimae predict`` and ``multimae pseudolabel``: inputs,
skip finished, batch, decode under an error policy, run, write, progress, report.

Inputs: a folder (recursively), the official layout's ``rgb/`` (or a split directory holding
one), WebDataset shards (a ``.tar`` path, a brace pattern or a comma list) or explicit image
files (:func:`open_items`); every source yields :class:`InputItem`s naming their output
``<class>/<name>``. :func:`run_batches` drives the rest: an item whose output name an earlier
one has is a bad input (never an overwrite), an item whose outputs exist is counted as already
done (resume), the others are read and decoded in batches of ``batch_size`` (a bad file goes
to ``on_bad``, which skips it or raises), and each batch of decoded items goes to ``process``
(the model and the writing); a progress bar counts images.
"""
from __future__ import annotations

import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from multimae.data.codecs import IMAGE_EXTS
from multimae.data.errors import DataError

SHARD_FIELDS = ("rgb.jpg", "rgb.jpeg", "rgb.png", "rgb.webp", "jpg", "jpeg", "png", "webp")
#: what a folder walk reads: the library's image formats and GIF (its first frame), as an explicit
#: file and the demo's uploads
WALK_EXTS = (*IMAGE_EXTS, "gif")
_SUFFIXES = {f".{e}" for e in WALK_EXTS}


@dataclass
class InputItem:
    """One image to label: the output ``cls/name``, its bytes (read lazily) and the file extension;
    ``rel``: its path relative to the input folder, without extension (predict mirrors it)."""

    cls: str
    name: str
    ext: str
    where: str
    read: Callable[[], bytes]
    rel: str | None = None

    @property
    def key(self) -> str:
        return f"{self.cls}/{self.name}"


def _safe_name(rel: str) -> str:
    """A relative path without extension -> one file stem (subdirectories joined by '__', no dots)."""
    return re.sub(r"[^\w\-]+", "_", rel.replace(os.sep, "__").replace("/", "__"))


def file_reader(path: Path) -> Callable[[], bytes]:
    """A reader of ``path``'s bytes (unreadable: a DataError naming it)."""
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"image {path}: unreadable ({e})") from None
    return read


def _images_under(root: Path) -> list[Path]:
    """Image files under ``root``; symbolic links to folders are followed, each real folder once
    (a link loop is not walked again)."""
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in seen)
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in _SUFFIXES]
    return out


def _check_unique(items: list[InputItem]) -> list[InputItem]:
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise DataError(f"{it.where} and {seen[it.key]} would both be written as {it.key}; rename one")
        seen[it.key] = it.where
    return items


def folder_items(root: Path) -> list[InputItem]:
    """Every image under ``root`` (recursively) -> class ``all``, name = its relative path."""
    files = _images_under(root)
    if not files:
        raise DataError(f"{root}: no image files (.{'/.'.join(WALK_EXTS)}) found")
    rels = [f.relative_to(root).with_suffix("").as_posix() for f in files]
    items = [InputItem("all", _safe_name(r), f.suffix[1:].lower(), str(f), file_reader(f), rel=r)
             for r, f in zip(rels, files)]
    return _check_unique(items)


def layout_items(rgb_dir: Path) -> list[InputItem]:
    """The official layout's ``rgb/<class or all>/<name>.<ext>``: class and name are kept."""
    items = []
    for cdir in sorted(p for p in rgb_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cdir.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _SUFFIXES:
                items.append(InputItem(cdir.name, f.stem, f.suffix[1:].lower(), str(f), file_reader(f)))
    if not items:
        raise DataError(f"{rgb_dir}: no images under its class directories (rgb/<class or all>/<name>.<ext>)")
    return _check_unique(items)


def shard_items(urls: list[str]) -> Iterator[InputItem]:
    """Samples of WebDataset shards; the image is the first of ``rgb.jpg``, ``jpg``, ``png``, ... present."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    for url in urls:
        try:
            for raw in group_by_keys(tar_file_expander(url_opener([{"url": url}]))):
                key = raw["__key__"]
                where = f"sample {key} in shard {url}"
                field = next((f for f in SHARD_FIELDS if f in raw), None)
                if field is None:
                    present = sorted(k for k in raw if not k.startswith("__"))

                    def fail(where=where, present=present) -> bytes:
                        raise DataError(f"{where}: no image field ({'/'.join(SHARD_FIELDS)}); has {present}")
                    yield InputItem("all", _safe_name(key), "png", where, fail)
                    continue
                data = raw[field]
                yield InputItem("all", _safe_name(key), field.rsplit(".", 1)[-1], where, lambda d=data: d)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"shard {url}: truncated or not a tar file ({type(e).__name__}: {e})") from None


def is_shard_input(spec: str) -> bool:
    return spec.endswith(".tar") or (".tar" in spec and ("{" in spec or "," in spec))


def open_input(spec: str | os.PathLike) -> tuple[str, list[InputItem] | Iterator[InputItem], int | None]:
    """``(kind, items, count or None)`` for a folder, a layout's ``rgb/`` (or a split directory
    holding one), or shards (a ``.tar`` path, a brace pattern or a comma list)."""
    s = str(spec)
    if is_shard_input(s):
        from webdataset.shardlists import expand_urls

        urls = [u for part in s.split(",") for u in expand_urls(part)]
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise DataError(f"shard {missing[0]}: not found")
        return "shards", shard_items(urls), None
    p = Path(s)
    if not p.is_dir():
        raise DataError(f"input {p}: not a directory, nor .tar shards")
    if p.name == "rgb" or (p / "rgb").is_dir():
        items = layout_items(p if p.name == "rgb" else p / "rgb")
        return "layout", items, len(items)
    items = folder_items(p)
    return "folder", items, len(items)


def open_items(input: Any) -> tuple[list[InputItem] | Iterator[InputItem], int | None, bool]:
    """``(items, count or None, mirror)`` of a folder, explicit files or shards; ``mirror``: output
    names are the items' relative paths (a folder, a layout, files) rather than their keys (shards)."""
    from multimae.apps.predict_io import output_names

    specs = [str(x) for x in input] if isinstance(input, (list, tuple)) else [str(input)]
    if len(specs) == 1 and Path(specs[0]).is_dir():
        kind, items, total = open_input(specs[0])
        return items, total, kind != "shards"
    shards = [s for s in specs if is_shard_input(s)]
    if shards and len(shards) == len(specs):
        _, items, total = open_input(",".join(shards))
        return items, total, False
    if shards:
        raise DataError(f"input {shards[0]}: .tar shards cannot be mixed with image files or folders")
    paths = [Path(s) for s in specs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"input {p}: not a file" + (" (give one folder, or files)" if p.is_dir() else ""))
    names = output_names(paths)
    items = [InputItem("all", n, p.suffix[1:].lower(), str(p), file_reader(p), rel=n) for n, p in zip(names, paths)]
    return items, len(items), True


# --- the pipeline --------------------------------------------------------------------------------

D = TypeVar("D")


@dataclass
class Counts:
    """What a pipeline run did: items processed now, found done before, bad (skipped: one line each
    in ``bad_files``), and its wall time."""

    processed: int = 0
    already_done: int = 0
    bad: int = 0
    seconds: float = 0.0
    bad_files: list[str] = field(default_factory=list)


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def run_batches(items: Iterable[InputItem], total: int | None, *, name: Callable[[InputItem], str],
                done: Callable[[InputItem, str], bool], decode: Callable[[InputItem], D],
                process: Callable[[Sequence[tuple[InputItem, str, D]]], None], on_bad: Callable[[DataError], None],
                batch_size: int, desc: str, progress: bool = True, counts: Counts | None = None) -> Counts:
    """Run the pipeline (see the module doc) over ``items`` (``total`` of them, when known, for the
    progress bar). ``name(item)``: its output name; ``done(item, name)``: whether its outputs all
    exist; ``decode(item)``: its model input (a DataError: bad); ``process(batch)``: run the
    model on a batch of ``(item, name, decoded)`` and write its outputs; ``on_bad(err)``: told of each bad item before it is
    counted (raise to stop). ``counts``: updated in place (a caller may read it after an error)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    counts = counts if counts is not None else Counts()
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True)

    def bad(err: DataError) -> None:
        on_bad(err)
        counts.bad += 1
        counts.bad_files.append(str(err))
        bar.update(1)

    def pending() -> Iterator[tuple[InputItem, str]]:
        seen: dict[str, str] = {}
        for it in items:
            n = name(it)
            if n in seen:
                bad(DataError(f"{it.where}: its outputs would overwrite those of {seen[n]} ({n}); rename one"))
                continue
            seen[n] = it.where
            if done(it, n):
                counts.already_done += 1
                bar.update(1)
                continue
            yield it, n

    start = time.perf_counter()
    try:
        for batch in batches(pending(), batch_size):
            decoded: list[tuple[InputItem, str, D]] = []
            for it, n in batch:
                try:
                    decoded.append((it, n, decode(it)))
                except DataError as err:
                    bad(err)
            if not decoded:
                continue
            process(decoded)
            counts.processed += len(decoded)
            bar.update(len(decoded))
            bar.set_postfix(bad=counts.bad, done_before=counts.already_done, refresh=False)
    finally:
        bar.close()
        counts.seconds = time.perf_counter() - start
    return counts
