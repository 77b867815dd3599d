"""Image-text data for M3AE: caption tables and collation.

:class:`CaptionTable` yields raw samples ``{"rgb": uint8 (3,H,W), "caption": str, "__key__": str}``;
unpaired data is a sample lacking one of the two (a row with an empty image or caption cell under
``data.missing=allow``, or ``data.image_only`` / ``data.text_only`` dropping one from paired
samples), the same mechanism as any modality a sample lacks (docs/data.md "Incomplete datasets").
:class:`TextCollator` turns transformed samples into a :class:`~multimae.core.batch.Batch`: ``caption``
ids with ``pad["caption"]`` and ``present["caption"]``, ``rgb`` with ``present["rgb"]``; a missing
modality becomes all padding / zeros flagged not present, so it gives no tokens and no loss.
(WebDataset shards with captions are read by :class:`~multimae.data.shards.ShardDataset`: a
``caption.txt`` or ``txt`` field.)
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from multimae.core.batch import Batch
from multimae.data import stack_present
from multimae.data.codecs import IMAGE_EXTS, decode_image
from multimae.data.errors import DataError, ErrorPolicy, check_missing
from multimae.data.tokenizers import TextEncoder
from multimae.core.seeding import derive_seed

TEXT_KEY, IMAGE_KEY = "caption", "rgb"


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
        missing: a row with an empty image cell or an empty caption (unpaired data): ``error``
            (bad data, ``on_error`` decides), ``skip`` (left out when the table is read, counted),
            ``allow`` (a text-only or image-only sample: the batch marks the other modality absent,
            as for any modality a sample lacks).

    A header naming the caption column ``captions`` makes each cell a JSON list of captions of one
    image (one sample per image, as ``multimae data prepare coco-captions --per-sample image``
    writes): :meth:`item_at_epoch` draws one of them with ``derive_seed(seed, "caption", epoch,
    index)``, so the draw changes every epoch and a resumed run draws the same ones; plain
    indexing gives epoch 0.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 image_col: int | str = 0, caption_col: int | str = 1, delimiter: str | None = None,
                 header: bool | None = None, on_error: str = "raise",
                 transform: Callable[[dict], dict] | None = None, seed: int = 0, missing: str = "error") -> None:
        self.path = Path(path)
        self.seed = seed
        self.missing = check_missing(missing)
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
            image, empty_caption = row[cols[0]].strip(), not (cell if self.multi else cell.strip())
            if (not image or empty_caption) and self.missing == "skip":  # left out, counted
                self.policy.counter.add(1)
                continue
            if not image and empty_caption:
                self.policy.handle(DataError(f"caption table {self.path} line {line}: neither image nor caption"))
                continue
            rows.append((line, image, cell))
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
        sample: dict = {"__key__": f"{Path(image or 'text').stem.replace('.', '_')}-l{line}"}
        if caption:
            sample[TEXT_KEY] = caption
        elif self.missing != "allow":
            raise DataError(f"{where}: empty caption (image {image}) (data.missing=error; 'allow' trains on the "
                            "image alone)")
        if not image and self.missing != "allow":
            raise DataError(f"{where}: no image (data.missing=error; 'allow' trains on the caption alone)")
        if image:  # an empty cell (missing="allow"): a text-only sample
            file = Path(image) if Path(image).is_absolute() else self.image_root / image
            try:
                data = file.read_bytes()
            except OSError as e:
                raise DataError(f"{where}: image file {file} unreadable ({type(e).__name__}: {e.strerror or e})") from None
            sample[IMAGE_KEY] = decode_image(data, 3, f"{where}: image file {file}")
        return sample

    def __getitem__(self, index: int) -> dict:
        return self.item_at_epoch(index, 0)

    def item_at_epoch(self, index: int, epoch: int) -> dict:
        """Sample ``index`` of ``epoch`` (transformed; a bad row is skipped under ``on_error=skip``)."""
        n = len(self.rows)
        for attempt in range(n):  # an empty table (every row skipped) goes straight to the error
            try:
                sample = self.load((index + attempt) % n, epoch)
                return self.transform(sample) if self.transform is not None else sample
            except DataError as err:
                self.policy.handle(err)
        raise DataError(f"caption table {self.path}: every one of the {n} rows is bad")


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

    def __call__(self, samples: list[dict]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        enc = self.encoder([s.get(self.text_key) for s in samples])
        t = self.text_key
        batch = Batch({t: enc["ids"]}, pad={t: enc["pad"]}, present={t: enc["present"]})
        for key in self.image_keys:
            shape = self.image_shapes.get(key)
            out = stack_present(samples, key, torch.zeros(shape) if shape is not None else None)
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
