"""Where the rgb images to label come from: a folder (recursively), the official layout's ``rgb/``,
or WebDataset shards. Every source yields :class:`InputItem`s naming the output ``<class>/<name>``."""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from multimae.data.codecs import IMAGE_EXTS
from multimae.data.errors import DataError

SHARD_FIELDS = ("rgb.jpg", "rgb.jpeg", "rgb.png", "rgb.webp", "jpg", "jpeg", "png", "webp")
#: what a folder walk reads: the library's image formats and GIF (its first frame), as an explicit
#: file and the demo's uploads
WALK_EXTS = (*IMAGE_EXTS, "gif")


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


def _file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"image {path}: unreadable ({e})") from None
    return read


def _images_under(root: Path) -> list[Path]:
    """Image files under ``root``; symbolic links to folders are followed, each real folder once
    (a link loop is not walked again)."""
    exts = {f".{e}" for e in WALK_EXTS}
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
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and Path(f).suffix.lower() in exts]
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
    items = [InputItem("all", _safe_name(r), f.suffix[1:].lower(), str(f), _file_reader(f), rel=r)
             for r, f in zip(rels, files)]
    return _check_unique(items)


def layout_items(rgb_dir: Path) -> list[InputItem]:
    """The official layout's ``rgb/<class or all>/<name>.<ext>``: class and name are kept."""
    exts = {f".{e}" for e in WALK_EXTS}
    items = []
    for cdir in sorted(p for p in rgb_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cdir.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts:
                items.append(InputItem(cdir.name, f.stem, f.suffix[1:].lower(), str(f), _file_reader(f)))
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
    return spec.endswith(".tar") or ("{" in spec and ".tar" in spec) or ("," in spec and ".tar" in spec)


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
    if p.name == "rgb":
        items = layout_items(p)
        return "layout", items, len(items)
    if (p / "rgb").is_dir():
        items = layout_items(p / "rgb")
        return "layout", items, len(items)
    items = folder_items(p)
    return "folder", items, len(items)
