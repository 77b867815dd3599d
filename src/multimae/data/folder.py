"""Folder-per-modality datasets in the official MultiMAE layout, and a writer for it.

Layout: ``root/<split>/<modality>/<class or "all">/<name>.<ext>``, the same ``<class>/<name>``
under every modality. The class directory gives the image-level label (index of the class in the
sorted class-directory names, or in ``classes`` of ``root/multimae_data.json`` when present);
``all`` means unlabelled. ``multimae_data.json`` (written by :func:`write_folder`) may also give
the 16-bit PNG scale of dense modalities; without it they are read as ``value / 2**16`` like the
official code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset, Subset

from multimae.core.io import save_bytes_atomic
from multimae.data.codecs import (
    DEFAULT_WRITE_PNG_SCALE, EXTS, LABEL_KEY, OFFICIAL_PNG_SCALE, PngScale, decoder_for, encode_field,
    scale_for,
)
from multimae.data.errors import DataError, ErrorPolicy, check_missing, notice_once
from multimae.data.fields import resolve_fields, validate_sample
from multimae.core.modalities import ModalitySpec
from multimae.core.seeding import derive_seed

META_FILE = "multimae_data.json"
UNLABELLED = "all"


def read_meta(root: str | os.PathLike) -> dict:
    """The dataset metadata ``root/multimae_data.json``, or {} when there is none."""
    path = Path(root) / META_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e})") from None


def _list_modality(mdir: Path, spec: ModalitySpec) -> dict[tuple[str, str], Path]:
    """``(class, name) -> file`` for one modality directory."""
    exts = {f".{e}" for e in EXTS[spec.kind]}
    files: dict[tuple[str, str], Path] = {}
    for cdir in _class_dirs(mdir):
        before = len(files)
        for entry in os.scandir(cdir):
            stem, ext = os.path.splitext(entry.name)
            if entry.name.startswith(".") or ext.lower() not in exts or not entry.is_file():
                continue
            if (cdir.name, stem) in files:
                raise DataError(f"{cdir / entry.name}: two files for sample {cdir.name}/{stem} "
                                f"({files[(cdir.name, stem)].name} and {entry.name})")
            files[(cdir.name, stem)] = Path(entry.path)
        if len(files) == before:
            notice_once(str(cdir), "empty", f"{cdir}: empty class directory (no .{'/.'.join(EXTS[spec.kind])} file): "
                    "it has no sample; as a class it keeps its place in the class list")
    if not files:
        raise DataError(f"{mdir}: empty, no .{'/.'.join(EXTS[spec.kind])} files under its class directories")
    return files


def class_directories(root: str | os.PathLike, split: str, key: str) -> list[str]:
    """The sorted class-directory names of ``root/split/key`` (``all`` included when present),
    the torchvision ImageFolder order: label i is the i-th name."""
    return [p.name for p in _class_dirs(Path(root) / split / key)]


def _class_dirs(mdir: Path) -> list[Path]:
    if not mdir.is_dir():
        raise DataError(f"{mdir}: modality directory not found "
                        "(expected root/<split>/<modality>/<class or all>/<name>.<ext>)")
    return sorted(p for p in mdir.iterdir() if p.is_dir() and not p.name.startswith("."))


class FolderDataset(Dataset):
    """Aligned modalities from a folder tree (official MultiMAE layout), yielding raw samples.

    Args:
        root: dataset root; samples are read from ``root/split``.
        split: e.g. ``train`` or ``val``.
        modalities: names of registered modalities, dicts or specs; each is read from the
            directory named by its batch key (``spec.key``). Add ``"label"`` to require labels.
        transform: applied to each raw sample (e.g. :class:`~multimae.data.transforms.PairedTransform`).
        on_error: ``raise`` a DataError naming the file, or ``skip``: warn, count in
            ``self.skipped`` and return the next good sample instead.
        label_from_class_dir: yield ``label`` (int64 ()) from the class directory unless it is "all".
        png_scale: 16-bit PNG scale(s) of dense modalities; None: metadata, else ``1 / 2**16``.
        classes: the class list (label = index in it), e.g. the training split's for an
            evaluation split, so that both index classes alike; a class directory not in it is a
            DataError naming the directory. None: ``classes`` of the metadata, else this split's
            sorted class directories (empty ones included, with a notice).
        missing: a sample lacking a modality's file: ``error`` (bad data: a DataError naming the
            file and the modality, or skipped under ``on_error="skip"``), ``skip`` (left out of the
            index and counted in ``skipped``), ``allow`` (kept: its raw sample lacks that key).
        required: keys a sample must have even under ``allow`` (a fine-tune's target): samples
            lacking one are left out and counted.
        packed: decode rgb / one-channel dense / categorical image files into
            :class:`~multimae.data.codecs.Packed` integers (validated as such) for a
            ``PairedTransform(fast=True)``, instead of the documented raw-sample tensors;
            ``"encoded"``: the same, with RGB JPEGs kept encoded for the training device's
            decoder (``data.decode=cuda``, :mod:`multimae.data.device_decode`).

    Missing files are found when the index is built: with ``raise`` the constructor fails, with
    ``skip`` those samples are left out of the index (and counted).
    """

    def __init__(self, root: str | os.PathLike, split: str, modalities: Sequence[str | dict | ModalitySpec],
                 transform: Callable[[dict], dict] | None = None, on_error: str = "raise",
                 label_from_class_dir: bool = True, png_scale: PngScale = None,
                 classes: Sequence[str] | None = None, packed: bool | str = False, missing: str = "error",
                 required: Sequence[str] = ()) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.packed = packed if packed == "encoded" else bool(packed)
        self.specs, want_label = resolve_fields(modalities)
        self.policy = ErrorPolicy(on_error)
        self.missing = check_missing(missing)
        self.required = tuple(required)
        meta = read_meta(root)
        self.png_scale = {k: scale_for(png_scale if png_scale is not None else meta.get("png_scale"), k,
                                       OFFICIAL_PNG_SCALE) for k in self.specs}
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: split directory not found")
        listing = {key: self._listing(split_dir / key, spec) for key, spec in self.specs.items()}
        self.samples = self._complete(listing, split_dir)
        if not self.samples:
            raise DataError(f"{split_dir}: no sample has every modality {list(self.specs)}" if self.missing != "allow"
                            else f"{split_dir}: no sample has the required modalities {list(self.required)}")
        class_dirs = sorted({next(iter(f.values())).parent.name for f in self.samples})
        first_key = next((k for k in self.specs if self.coverage.get(k)), next(iter(self.specs)))
        if meta.get("classes"):
            self.classes: list[str] = list(meta["classes"])
        elif classes is not None:
            self.classes = list(classes)
        else:
            self.classes = [c for c in class_directories(self.root, split, first_key) if c != UNLABELLED]
        labelled = class_dirs != [UNLABELLED]
        if labelled and UNLABELLED in class_dirs:
            raise DataError(f"{split_dir}: mixes an '{UNLABELLED}' directory with class directories {class_dirs}")
        unknown = sorted(set(class_dirs) - set(self.classes) - {UNLABELLED})
        if unknown:
            whose = f"{META_FILE} classes" if meta.get("classes") else (
                "the training split's class directories" if classes is not None else "the class list")
            raise DataError(f"{split_dir / first_key / unknown[0]}: class directory {unknown[0]!r} is not among {whose} "
                            f"({len(self.classes)}: {', '.join(self.classes[:8])}{' ...' if len(self.classes) > 8 else ''})"
                            + (f"; also unknown: {unknown[1:]}" if len(unknown) > 1 else ""))
        if want_label and not labelled:
            raise DataError(f"{split_dir}: 'label' requested but samples are under '{UNLABELLED}/', "
                            "not class directories")
        self.with_label = labelled and (label_from_class_dir or want_label)

    def _listing(self, mdir: Path, spec: ModalitySpec) -> dict[tuple[str, str], Path]:
        """The files of one modality directory; under ``missing="allow"`` a directory that is not
        there (or holds no file) is a modality no sample has (one notice), not an error."""
        if self.missing == "allow" and spec.key not in self.required and (
                not mdir.is_dir() or not any(p.is_dir() for p in mdir.iterdir())):
            notice_once(str(mdir), "absent", f"{mdir}: no such modality directory: no sample has {spec.key} "
                        "(data.missing=allow)")
            return {}
        return _list_modality(mdir, spec)

    def _complete(self, listing: dict[str, dict[tuple[str, str], Path]], split_dir: Path) -> list[dict[str, Path]]:
        """Samples with their files. A sample lacking a modality's file is, by ``self.missing``:
        an error (``on_error`` decides), left out and counted (``skip``; also under ``allow`` when
        the modality is ``required``), or kept without it (``allow``). ``self.coverage`` counts the
        samples having each modality, among the ``self.listed`` ones found."""
        names = sorted(set().union(*listing.values()))
        self.listed = len(names)
        self.coverage = {k: len(files) for k, files in listing.items()}
        out: list[dict[str, Path]] = []
        dropped: dict[str, int] = {}
        for cname in names:
            absent = [k for k, files in listing.items() if cname not in files]
            if absent:
                if self.missing == "error":
                    k = absent[0]
                    exts = "|".join(EXTS[self.specs[k].kind])
                    self.policy.handle(DataError(
                        f"sample {cname[0]}/{cname[1]}: missing {k} file {split_dir / k / cname[0] / cname[1]}.<{exts}>"
                        " (data.missing=error; 'skip' leaves such samples out, 'allow' trains without the modality)"
                    ))
                    continue
                if self.missing == "skip" or any(k in self.required for k in absent):
                    for k in absent:
                        dropped[k] = dropped.get(k, 0) + 1
                    self.policy.counter.add(1)
                    continue
            out.append({k: files[cname] for k, files in listing.items() if cname in files})
        if dropped:
            why = "data.missing=skip" if self.missing == "skip" else f"required: {list(self.required)}"
            notice_once(str(split_dir), "missing", f"{split_dir}: left out {self.listed - len(out)} of {self.listed} "
                        f"samples lacking a modality file ({why}); lacking: "
                        + ", ".join(f"{k} {n}" for k, n in dropped.items()))
        return out

    @property
    def skipped(self) -> int:
        """Samples skipped so far (index building and loading, summed over worker processes)."""
        return self.policy.skipped

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        """Sample id ``<class>/<name>``."""
        path = next(iter(self.samples[index].values()))
        return f"{path.parent.name}/{path.stem}"

    def files(self, index: int) -> dict[str, Path]:
        """The file of each modality of sample ``index``."""
        return dict(self.samples[index])

    def load(self, index: int) -> dict:
        """Decode and validate sample ``index`` (no transform); DataError naming the file if bad."""
        files = self.samples[index]  # under missing="allow": only the modalities the sample has
        sample: dict = {"__key__": self.key(index)}
        where = {k: f"{k} file {p}" for k, p in files.items()}
        decode = decoder_for(self.packed)
        for key, path in files.items():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"{where[key]}: unreadable ({e})") from None
            sample[key] = decode(data, path.suffix[1:], self.specs[key], self.png_scale[key], where[key])
        self.policy.count_invalid(
            validate_sample(sample, {k: self.specs[k] for k in files}, where,
                            f"sample {sample['__key__']} in {self.root / self.split}"))
        if self.with_label:
            sample[LABEL_KEY] = torch.tensor(self.classes.index(next(iter(files.values())).parent.name))
        return sample

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        for attempt in range(n):
            try:
                sample = self.load((index + attempt) % n)
                return self.transform(sample) if self.transform is not None else sample
            except DataError as err:
                self.policy.handle(err)
        raise DataError(f"{self.root / self.split}: every one of the {n} samples is bad")


def holdout(keys: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Split sample indices into (training, held out) by a fixed hash of each sample's key.

    The ``round(fraction * n)`` keys (at least 1, at most ``n - 1``) with the smallest hashes
    are held out: the split depends on the keys only -- not on the run seed, the file order or
    the number of workers -- and every run over the same files holds out the same samples.
    """
    n = len(keys)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1) to hold out samples, got {fraction}")
    if n < 2:
        raise DataError(f"cannot hold out a validation slice of {n} sample(s) (data.val_fraction={fraction})")
    count = min(n - 1, max(1, round(fraction * n)))
    ranked = sorted(range(n), key=lambda i: derive_seed("folder-holdout", keys[i]))
    return sorted(ranked[count:]), sorted(ranked[:count])


def open_folder(root: str | os.PathLike, split: str, specs: Sequence[str | dict | ModalitySpec], *,
                val_split: str = "val", val_fraction: float = 0.0, train: bool = True,
                on_error: str = "raise", packed: bool | str = False, missing: str = "error") -> Dataset | None:
    """The training data (``train=True``) or the validation data of a folder dataset.

    Validation is ``root/<val_split>`` when that directory exists. Otherwise, with
    ``val_fraction > 0``, it is a fixed slice of ``root/<split>`` (:func:`holdout`), which the
    training data then leaves out; with ``val_fraction == 0`` there is none: training uses all
    of ``split`` and the validation data is None (one notice says evaluation is skipped).
    ``packed``, ``missing``: see :class:`FolderDataset`.
    """
    if (Path(root) / val_split).is_dir():
        return FolderDataset(root, split if train else val_split, specs, on_error=on_error, packed=packed,
                             missing=missing)
    full = FolderDataset(root, split, specs, on_error=on_error, packed=packed, missing=missing)
    if val_fraction <= 0:
        if not train:
            notice_once(str(root), val_split, "none", f"{Path(root) / val_split}: no validation split and "
                    f"data.val_fraction=0: held-out evaluation and figure skipped (set data.val_fraction, e.g. "
                    f"0.05, to hold out part of {split}/)")
            return None
        return full
    keep, held = holdout([full.key(i) for i in range(len(full))], val_fraction)
    notice_once(str(root), val_split, "holdout", f"{Path(root) / val_split}: no validation split; holding out {len(held)} "
            f"of {len(full)} samples of {split}/ for validation (data.val_fraction={val_fraction:g}, fixed by "
            "the sample names)")
    return Subset(full, keep if train else held)


def write_folder(samples: Iterable[dict], root: str | os.PathLike, split: str, image_format: str = "png",
                 png_scale: float = DEFAULT_WRITE_PNG_SCALE, classes: Sequence[str] | None = None) -> int:
    """Write raw samples in the folder layout; returns the number written.

    A sample with a ``label`` goes under ``classes[label]`` (when ``classes`` is given), else under
    ``all``. Single-channel float maps become 16-bit PNGs of ``round(value / png_scale)``; the
    scale and the classes are recorded in ``root/multimae_data.json``.
    """
    root = Path(root)
    png16: set[str] = set()
    count = 0
    for sample in samples:
        name = str(sample["__key__"]).replace("/", "_")
        label = sample.get(LABEL_KEY)
        cdir = classes[int(label)] if classes is not None and label is not None else UNLABELLED
        for key, value in sample.items():
            if key.startswith("__") or key == LABEL_KEY:
                continue
            ext, data = encode_field(value, key, image_format, png_scale, where=f"sample {name} field {key}")
            if ext == "png" and getattr(value, "is_floating_point", lambda: False)() and value.shape[0] == 1:
                png16.add(key)
            path = root / split / key / cdir / f"{name}.{ext}"
            save_bytes_atomic(path, data, fsync=False)  # many small files, rewritten by a re-run
        count += 1
    meta = read_meta(root)
    meta.update(format="multimae-folder", version=1)
    meta["png_scale"] = {**meta.get("png_scale", {}), **{k: png_scale for k in sorted(png16)}}
    if classes is not None:
        meta["classes"] = list(classes)
    root.mkdir(parents=True, exist_ok=True)
    save_bytes_atomic(root / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return count
