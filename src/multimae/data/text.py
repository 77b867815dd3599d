"""Image-text data for M3AE: caption tables, img2dataset shards, unpaired sources, mixing, collation.

Datasets yield raw samples ``{"rgb": uint8 (3,H,W), "caption": str, "__key__": str}``; unpaired
sources drop one of the two (:class:`ImageOnly` has no ``caption``, :class:`TextOnly` no ``rgb``).
:class:`MixedStream` interleaves paired and unpaired sources in set proportions, and
:class:`TextCollator` turns transformed samples into a :class:`~multimae.core.batch.Batch`: ``caption``
ids with ``pad["caption"]`` and ``present["caption"]``, ``rgb`` with ``present["rgb"]``; a missing
modality becomes all padding / zeros flagged not present, so it gives no tokens and no loss.
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from multimae.core.batch import Batch
from multimae.data.codecs import IMAGE_EXTS, decode_image, decode_text
from multimae.data.errors import DataError, ErrorPolicy
from multimae.data.shards import ShardDataset
from multimae.data.tokenizers import TextEncoder, captions_from_file
from multimae.core.seeding import derive_seed

TEXT_KEY, IMAGE_KEY = "caption", "rgb"
_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def _sample_key(image: str, line: int) -> str:
    return f"{Path(image).stem.replace('.', '_')}-l{line}"


class CaptionTable(Dataset):
    """(image path, caption) rows of a CSV/TSV file -> raw samples ``rgb`` uint8 (3,H,W), ``caption``.

    Args:
        path: the table. Relative image paths are resolved against ``image_root`` (default: the
            table's directory).
        image_col, caption_col: column indices, or names when the table has a header.
        delimiter: ``","`` or ``"\\t"``; None: a ``.tsv`` / ``.csv`` suffix decides, else a tab in
            the first line means TSV.
        header: whether the first row names the columns; None: it does when its image cell has
            no image extension.
        on_error: ``raise`` a DataError naming the table, line and file, or ``skip`` the row
            (counted in ``skipped``, a warning is logged).
        transform: applied to each raw sample.
        seed: seeds the caption drawn per epoch from a ``captions`` cell (below).

    A header naming the caption column ``captions`` makes each cell a JSON list of captions of one
    image (one sample per image, as ``multimae data prepare coco-captions --per-sample image``
    writes): :meth:`item_at_epoch` draws one of them with ``derive_seed(seed, "caption", epoch,
    index)``, so the draw changes every epoch and a resumed run draws the same ones; plain
    indexing gives epoch 0.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 image_col: int | str = 0, caption_col: int | str = 1, delimiter: str | None = None,
                 header: bool | None = None, on_error: str = "raise",
                 transform: Callable[[dict], dict] | None = None, seed: int = 0) -> None:
        self.path = Path(path)
        self.seed = seed
        self.multi = False  # cells of the caption column are JSON lists (a "captions" header)
        if not self.path.is_file():
            raise DataError(f"caption table {self.path} not found")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.policy, self.transform = ErrorPolicy(on_error), transform
        self.delimiter = delimiter or self._sniff()
        self.rows: list[tuple[int, str, str]] = self._read(image_col, caption_col, header)

    def _sniff(self) -> str:
        if self.path.suffix.lower() in (".tsv", ".csv"):
            return "\t" if self.path.suffix.lower() == ".tsv" else ","
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return "\t" if "\t" in f.readline() else ","

    def _read(self, image_col: int | str, caption_col: int | str, header: bool | None) -> list[tuple[int, str, str]]:
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                table = [(reader.line_num, row) for row in reader if row]
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"caption table {self.path}: unreadable ({type(e).__name__}: {e})") from None
        if not table:
            raise DataError(f"caption table {self.path}: no rows")
        names = [c.strip() for c in table[0][1]]
        if header is None:
            first = table[0][1][image_col] if isinstance(image_col, int) and image_col < len(names) else ""
            header = isinstance(image_col, str) or Path(first.strip()).suffix.lower().lstrip(".") not in IMAGE_EXTS
        cols = []
        for c in (image_col, caption_col):
            if isinstance(c, str):
                if not header or c not in names:
                    raise DataError(f"caption table {self.path}: no column named {c!r} "
                                    f"(header: {names if header else None})")
                c = names.index(c)
            cols.append(c)
        self.multi = bool(header) and cols[1] < len(names) and names[cols[1]] == "captions"
        rows = []
        for line, row in table[1:] if header else table:
            if len(row) <= max(cols):
                self.policy.handle(DataError(f"caption table {self.path} line {line}: {len(row)} column(s), "
                                             f"expected at least {max(cols) + 1} (delimiter {self.delimiter!r})"))
                continue
            cell: str | list[str] = row[cols[1]]
            if self.multi:
                try:
                    cell = json.loads(cell)
                except ValueError:
                    cell = None  # type: ignore[assignment]
                if not isinstance(cell, list) or not cell or not all(isinstance(c, str) for c in cell):
                    self.policy.handle(DataError(f"caption table {self.path} line {line}: a 'captions' cell must "
                                                 "be a non-empty JSON list of strings"))
                    continue
            rows.append((line, row[cols[0]].strip(), cell))
        return rows

    @property
    def skipped(self) -> int:
        """Rows skipped so far (table reading and loading, summed over worker processes)."""
        return self.policy.skipped

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, epoch: int = 0) -> dict:
        """Decode row ``index`` (no transform; a ``captions`` row: the caption drawn for ``epoch``);
        DataError naming the table line and the file if bad."""
        line, image, caption = self.rows[index]
        where = f"caption table {self.path} line {line}"
        if isinstance(caption, list):
            caption = caption[random.Random(derive_seed(self.seed, "caption", epoch, index)).randrange(len(caption))]
        caption = caption.strip()
        if not caption:
            raise DataError(f"{where}: empty caption (image {image})")
        file = Path(image) if Path(image).is_absolute() else self.image_root / image
        try:
            data = file.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: image file {file} unreadable ({type(e).__name__}: {e.strerror or e})") from None
        rgb = decode_image(data, 3, f"{where}: image file {file}")
        return {IMAGE_KEY: rgb, TEXT_KEY: caption, "__key__": _sample_key(image, line)}

    def __getitem__(self, index: int) -> dict:
        return self.item_at_epoch(index, 0)

    def item_at_epoch(self, index: int, epoch: int) -> dict:
        """Sample ``index`` of ``epoch`` (transformed; a bad row is skipped under ``on_error=skip``)."""
        n = len(self.rows)
        for attempt in range(max(n, 1)):
            try:
                sample = self.load((index + attempt) % n, epoch)
                return self.transform(sample) if self.transform is not None else sample
            except DataError as err:
                self.policy.handle(err)
        raise DataError(f"caption table {self.path}: every one of the {n} rows is bad")


class ImageTextShards(ShardDataset):
    """img2dataset-style WebDataset shards (``key.jpg`` + ``key.txt`` (+ ``key.json``)) -> raw samples
    ``{"rgb": uint8 (3,H,W), "caption": str, "__key__"}``.

    The image may also be ``png``/``webp``; without a ``txt`` the ``caption`` field of the ``json``
    record is used. Splitting by rank and DataLoader worker, shuffling, epochs and ``on_error``
    are those of :class:`~multimae.data.shards.ShardDataset` (same arguments).
    """

    def __init__(self, urls: str | Sequence[str], transform: Callable[[dict], dict] | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0, on_error: str = "raise", rank: int | None = None,
                 world_size: int | None = None, samples_per_rank: int | Literal["auto"] | None = None) -> None:
        super().__init__(urls, [IMAGE_KEY, TEXT_KEY], transform=transform, shuffle_buffer=shuffle_buffer, seed=seed,
                         on_error=on_error, rank=rank, world_size=world_size, samples_per_rank=samples_per_rank)

    def decode(self, raw: dict) -> dict:
        """Bytes fields of one tar sample -> a raw image-text sample; DataError naming key and shard."""
        key, url = raw["__key__"], raw.get("__url__", "?")
        where = f"sample {key} in shard {url}"
        fields = sorted(k for k in raw if not k.startswith("__"))
        image = next((f for f in _IMAGE_FIELDS if f in raw), None)
        if image is None:
            raise DataError(f"{where}: no image (expected one of {list(_IMAGE_FIELDS)}, has {fields})")
        if "txt" in raw:
            caption = decode_text(raw["txt"], f"{where}: txt")
        elif "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (UnicodeDecodeError, ValueError) as e:
                raise DataError(f"{where}: json is not valid JSON ({e})") from None
            caption = meta.get("caption") if isinstance(meta, dict) else None
            if not isinstance(caption, str):
                raise DataError(f"{where}: no txt and the json record has no 'caption' string (has {fields})")
        else:
            raise DataError(f"{where}: no caption (expected 'txt' or a json 'caption', has {fields})")
        if not caption.strip():
            raise DataError(f"{where}: empty caption")
        return {IMAGE_KEY: decode_image(raw[image], 3, f"{where}: {image}"), TEXT_KEY: caption.strip(), "__key__": key}


# --- unpaired sources and mixing ----------------------------------------------------------------------


def is_map_style(ds: object) -> bool:
    """Whether ``ds`` supports ``len`` and indexing (else it is iterated)."""
    if hasattr(ds, "map_style"):
        return bool(ds.map_style)  # type: ignore[attr-defined]
    return not isinstance(ds, IterableDataset) and hasattr(ds, "__getitem__") and hasattr(ds, "__len__")


def _split_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(shard id, number of shards) of this process and DataLoader worker."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class _Without(Dataset):
    """A dataset whose samples lose some keys (map-style or iterable, like the wrapped one)."""

    drop: tuple[str, ...] = ()

    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    @property
    def map_style(self) -> bool:
        return is_map_style(self.dataset)

    def _strip(self, sample: dict) -> dict:
        return {k: v for k, v in sample.items() if k not in self.drop}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        return self._strip(self.dataset[index])  # type: ignore[index]

    def __iter__(self) -> Iterator[dict]:
        items = (self.dataset[i] for i in range(len(self))) if self.map_style else iter(self.dataset)  # type: ignore
        for sample in items:
            yield self._strip(sample)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]


class ImageOnly(_Without):
    """Image-only samples from any dataset: its samples without ``caption``."""

    drop = (TEXT_KEY,)


class TextOnly(Dataset):
    """Text-only samples ``{"caption": str, "__key__": "text-<i>"}``.

    ``captions``: a sequence of str (map-style), or a path to a UTF-8 file with one caption per line
    (iterable; lines are split across ranks and DataLoader workers), or any re-iterable of str.
    """

    def __init__(self, captions: Iterable[str] | str | os.PathLike, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.captions = captions
        self.rank, self.world_size = rank, world_size
        if isinstance(captions, (str, os.PathLike)) and not Path(captions).is_file():
            raise DataError(f"caption file {captions} not found")

    @property
    def map_style(self) -> bool:
        return isinstance(self.captions, Sequence) and not isinstance(self.captions, str)

    def _sample(self, i: int, text: object) -> dict:
        if not isinstance(text, str):
            raise DataError(f"text-only caption {i} is a {type(text).__name__}, expected str")
        return {TEXT_KEY: text, "__key__": f"text-{i:08d}"}

    def __len__(self) -> int:
        if not self.map_style:
            raise TypeError("TextOnly over a file or an iterable has no length")
        return len(self.captions)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        return self._sample(index, self.captions[index])  # type: ignore[index]

    def __iter__(self) -> Iterator[dict]:
        if self.map_style:
            yield from (self[i] for i in range(len(self)))
            return
        shard, shards = _split_info(self.rank, self.world_size)
        src = captions_from_file(self.captions) if isinstance(self.captions, (str, os.PathLike)) else self.captions
        for i, text in enumerate(src):  # type: ignore[arg-type]
            if i % shards == shard:
                yield self._sample(i, text)


def _map_stream(ds: object, name: str, seed: int, epoch: int, shard: int, shards: int) -> Iterator[dict]:
    """Endless reshuffled passes over a map-style source; this shard's share of every pass."""
    n = len(ds)  # type: ignore[arg-type]
    rounds = 0
    while True:
        order = list(range(n))
        random.Random(derive_seed(seed, epoch, rounds, name, "order")).shuffle(order)
        mine = order[shard::shards] or [order[shard % n]]
        for i in mine:
            yield ds[i]  # type: ignore[index]
        rounds += 1


def _iter_stream(ds: object, name: str) -> Iterator[dict]:
    """Endless passes over an iterable source (each restart is the source's next epoch)."""
    while True:
        empty = True
        for sample in ds:  # type: ignore[attr-defined]
            empty = False
            yield sample
        if empty:
            raise DataError(f"mixed stream: source {name!r} yielded no sample")


class MixedStream(IterableDataset):
    """Paired, image-only and text-only samples interleaved in set proportions.

    Args:
        sources: name -> dataset (map-style: reshuffled every pass; iterable: restarted when
            exhausted, and expected to split itself across ranks/workers like ShardDataset).
        weights: name -> relative frequency (>= 0; normalised). Every source needs one.
        seed: the stream depends only on (seed, epoch, rank, worker).
        samples_per_rank: samples per epoch per rank (split over DataLoader workers); None: endless.
        rank, world_size: default to the RANK / WORLD_SIZE environment variables, else 0 / 1.

    Every sample gets ``__source__`` (its source's name). Each ``__iter__`` is one epoch: the one
    given to :meth:`set_epoch`, else the previous + 1.
    """

    def __init__(self, sources: Mapping[str, object], weights: Mapping[str, float], seed: int = 0,
                 samples_per_rank: int | None = None, rank: int | None = None, world_size: int | None = None) -> None:
        if not sources:
            raise ValueError("MixedStream: no sources")
        missing, extra = set(sources) - set(weights), set(weights) - set(sources)
        if missing or extra:
            raise ValueError(f"MixedStream: weights must name exactly the sources {sorted(sources)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        if any(float(w) < 0 for w in weights.values()) or sum(float(w) for w in weights.values()) <= 0:
            raise ValueError(f"MixedStream: weights must be >= 0 with a positive sum, got {dict(weights)}")
        for name, ds in sources.items():
            if is_map_style(ds) and len(ds) == 0 and float(weights[name]) > 0:  # type: ignore[arg-type]
                raise DataError(f"MixedStream: source {name!r} is empty")
        self.sources, self.seed = dict(sources), seed
        self.weights = {k: float(v) / sum(float(w) for w in weights.values()) for k, v in weights.items()}
        self.samples_per_rank, self.rank, self.world_size = samples_per_rank, rank, world_size
        self.epoch, self._epoch_set, self._last_epoch = 0, True, -1

    def __len__(self) -> int:
        if self.samples_per_rank is None:
            raise TypeError("MixedStream has a length only with samples_per_rank")
        return int(self.samples_per_rank)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (and pass it to sources that take it)."""
        self.epoch, self._epoch_set = epoch, True
        for ds in self.sources.values():
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)  # type: ignore[attr-defined]

    def _next_epoch(self) -> int:
        epoch = self.epoch if self._epoch_set else self._last_epoch + 1
        self._epoch_set, self._last_epoch = False, epoch
        return epoch

    def __iter__(self) -> Iterator[dict]:
        epoch = self._next_epoch()
        shard, shards = _split_info(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        names = [n for n, w in self.weights.items() if w > 0]
        streams = {n: _map_stream(self.sources[n], n, self.seed, epoch, shard, shards) if is_map_style(self.sources[n])
                   else _iter_stream(self.sources[n], n) for n in names}
        rng = random.Random(derive_seed(self.seed, epoch, shard, shards, "mix"))
        quota = None
        if self.samples_per_rank is not None:
            n = int(self.samples_per_rank)
            quota = n // workers + (1 if worker < n % workers else 0)
        produced = 0
        while quota is None or produced < quota:
            name = rng.choices(names, weights=[self.weights[n] for n in names])[0]
            sample = dict(next(streams[name]))
            sample["__source__"] = name
            yield sample
            produced += 1


# --- collation -------------------------------------------------------------------------------------------


class TextCollator:
    """Samples (already transformed: ``rgb`` float (3,S,S), ``caption`` str) -> a Batch.

    The batch holds ``caption`` int64 (B, L) ids with ``pad[caption]`` bool (B, L) (True =
    padding) and ``present[caption]`` bool (B,); for each image key the stacked tensor (zeros
    where a sample lacks it) and ``present[key]`` bool (B,). A batch where no sample has an image
    key gets zeros of ``image_shapes[key]`` when given, else no such key. Other keys go to
    ``extra``, stacked (tensors, numbers) or listed (str, e.g. ``__key__``, ``__source__``); a
    tensor or number key that only some samples have is an error.
    """

    def __init__(self, encoder: TextEncoder, text_key: str = TEXT_KEY, image_keys: Sequence[str] = (IMAGE_KEY,),
                 image_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.encoder, self.text_key = encoder, text_key
        self.image_keys = tuple(image_keys)
        self.image_shapes = {k: tuple(v) for k, v in (image_shapes or {}).items()}

    def _images(self, samples: list[dict], key: str) -> tuple[Tensor, Tensor] | None:
        values = [s.get(key) for s in samples]
        ref = next((v for v in values if v is not None), None)
        if ref is None:
            if key not in self.image_shapes:
                return None
            ref = torch.zeros(self.image_shapes[key])
        for s, v in zip(samples, values):
            if v is not None and (not torch.is_tensor(v) or v.shape != ref.shape):
                got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                raise DataError(f"cannot collate {key!r} of sample {s.get('__key__', '?')}: {got}, "
                                f"expected a tensor of shape {tuple(ref.shape)} (transform the samples first)")
        zeros = torch.zeros_like(ref)
        stacked = torch.stack([v if v is not None else zeros for v in values])
        return stacked, torch.tensor([v is not None for v in values], dtype=torch.bool)

    def __call__(self, samples: list[dict]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        enc = self.encoder([s.get(self.text_key) for s in samples])
        t = self.text_key
        batch = Batch({t: enc["ids"]}, pad={t: enc["pad"]}, present={t: enc["present"]})
        for key in self.image_keys:
            out = self._images(samples, key)
            if out is not None:
                batch.tensors[key], batch.present[key] = out
        extra = batch.extra
        done = {t, *self.image_keys}
        for key in dict.fromkeys(k for s in samples for k in s if k not in done):
            values = [s.get(key) for s in samples]
            if all(torch.is_tensor(v) for v in values):
                extra[key] = torch.stack(values)  # type: ignore[arg-type]
            elif all(isinstance(v, (bool, int, float)) for v in values):
                extra[key] = torch.tensor(values)
            elif all(v is None or isinstance(v, str) for v in values):
                extra[key] = values
            else:
                kinds = sorted({type(v).__name__ for v in values})
                raise DataError(f"cannot collate {key!r}: values are {kinds} across samples (only {t!r} and "
                                f"image keys {list(self.image_keys)} may be missing from a sample)")
        return batch
