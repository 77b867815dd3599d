"""Downstream data sources by name: the one place that knows what ``data.source`` means.

A :class:`Source` turns a request (the run's data config, the fields to read, a split) into the
untransformed map-style dataset of that split, and says what only it knows: the fixed class
names of its tasks (the synthetic scenes), whether it streams (WebDataset shards are read by
:mod:`multimae.data.shards`), the word for its held-out samples. Code above ``data/`` asks the
registry and never compares source names; a new source is one :func:`register_source` call (a
benchmark registers its variant of the synthetic scenes that way, then sets ``data.source``).

The data config is duck-typed (any object with the fields a source reads: ``root``, ``seed``,
``image_size``, ``train_samples`` / ``val_samples`` / ``test_samples``, ``cache``, ``on_error``,
``train_split``), so this module needs nothing from the tasks above it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from multimae.data.errors import DataError

#: The synthetic downstream scenes' splits; split i uses the stream ``data.seed + i``.
SYNTHETIC_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Request:
    """What a task asks of a source: ``split`` of ``data`` with ``fields`` (modality specs and
    the ``label`` field name); ``classes``: the class list every split indexes (classification
    from folders), or None."""

    data: Any
    fields: Sequence[Any]
    split: str
    train: bool
    classification: bool = False
    num_classes: int | None = None
    required: Sequence[str] = ()  # keys a sample must have even under data.missing=allow (the target)

    @property
    def keys(self) -> list[str]:
        return sorted({f if isinstance(f, str) else f.key for f in self.fields})


@dataclass(frozen=True)
class Source:
    """A named downstream source. ``dataset(request) -> map-style Dataset`` (None for a streaming
    source); ``classes(head kind) -> names`` when the source fixes them."""


    name: str
    dataset: Callable[[Request], Dataset] | None = None
    classes: Callable[[str], list[str] | None] = lambda kind: None
    streams: bool = False
    held_out_word: str = "held-out samples"
    open_to_check: bool = False  # open the evaluated split before training (cheap: a directory listing)
    held_out: bool = False  # pretraining: the source has held-out samples to evaluate on
    browsable_root: bool = False  # its samples are files under data.root (the demo offers them)


_SOURCES: dict[str, Source] = {}


def register_source(source: Source, replace: bool = False) -> Source:
    """Make ``source`` available as ``data.source=<name>``."""
    if source.name in _SOURCES and not replace:
        raise ValueError(f"data source {source.name!r} is already registered (replace=True to override)")
    _SOURCES[source.name] = source
    return source


def get_source(name: str) -> Source:
    """The registered source ``name``; a DataError listing the known ones otherwise."""
    if name not in _SOURCES:
        raise DataError(f"data.source={name!r}: unknown source; known: {', '.join(sorted(_SOURCES))}")
    return _SOURCES[name]


# ------------------------------------------------------------------------------- built-in sources

def _synthetic_dataset(r: Request) -> Dataset:
    from multimae.data.loader import CachedDataset
    from multimae.data.synthetic import SyntheticScenes

    d = r.data
    if r.split not in SYNTHETIC_SPLITS:
        raise DataError(f"synthetic downstream data has splits {list(SYNTHETIC_SPLITS)}, not {r.split!r}")
    n = {"train": d.train_samples, "val": d.val_samples, "test": d.test_samples}[r.split]
    ds: Dataset = SyntheticScenes(n, image_size=d.image_size, seed=d.seed + SYNTHETIC_SPLITS.index(r.split),
                                  modalities=r.keys)
    return CachedDataset(ds) if d.cache else ds


def _synthetic_classes(kind: str) -> list[str] | None:
    from multimae.data.synthetic import LABEL_CLASSES, SEMSEG_CLASSES

    return list(LABEL_CLASSES) if kind == "classification" else list(SEMSEG_CLASSES) if kind == "segmentation" \
        else None


def _folder_dataset(r: Request) -> Dataset:
    from multimae.data.folder import UNLABELLED, FolderDataset, class_directories, read_meta

    d = r.data
    if not d.root:
        raise DataError("data.root must be set for data.source=folder")
    classes = None
    if r.classification:
        # every split indexes the training split's classes (sorted directory names, as
        # torchvision's ImageFolder), so a class missing from one split shifts no label
        first = r.fields[0].key
        classes = getattr(d, "classes", None) or read_meta(d.root).get("classes") or [
            c for c in class_directories(d.root, d.train_split, first) if c != UNLABELLED]
        k = r.num_classes
        if k is not None and len(classes) > k:
            raise DataError(f"{d.root}/{d.train_split}/{first}: {len(classes)} class directories "
                            f"({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}) but "
                            f"model.head.num_classes={k}; set model.head.num_classes={len(classes)}")
    return FolderDataset(d.root, r.split, list(r.fields), on_error=d.on_error, classes=classes,
                         missing=getattr(d, "missing", "error"), required=r.required)


register_source(Source("synthetic", _synthetic_dataset, _synthetic_classes, held_out_word="unseen scenes",
                       held_out=True))
register_source(Source("folder", _folder_dataset, open_to_check=True, held_out=True, browsable_root=True))
register_source(Source("shards", streams=True))
register_source(Source("captions", streams=False))  # pretraining only: image-caption tables
