"""Typed configuration of the data path: where samples come from and how batches are masked.

Part of a run config (``PretrainConfig.data`` / ``.mask``); lives here so that the loader in
:mod:`multimae.data.loader` never imports ``training/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    source: Literal["synthetic", "folder", "shards", "captions"] = "synthetic"
    root: str | None = None  # folder: dataset root (root/<split>/<modality>/...); captions: CSV/TSV table
    image_root: str | None = None  # captions: where relative image paths start (default: the table's folder)
    split: str = "train"
    val_split: str = "val"  # folder: the validation split used by the end-of-run evaluation and figure
    # folder without a val_split directory: hold out this fraction of `split` (fixed by the sample
    # names) for validation; 0: train on all of it and skip the held-out evaluation
    val_fraction: float = 0.0
    urls: str | None = None  # shards: brace pattern or comma list of .tar files
    # samples per epoch (all ranks). synthetic: scenes per epoch (None: 4096); shards: None counts
    # the samples in the local shards (tar headers only, see epoch_samples); remote shards need it
    num_samples: int | None = None
    val_samples: int = 64  # held-out synthetic scenes for the end-of-run evaluation
    image_size: int | None = None  # None: the model's image_size (set it to train at another size)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale (paper: 0.2-1)
    hflip: float = 0.5
    cache: bool = False  # synthetic: render once into memory, augment on the fly
    # loader worker processes per rank; "auto": the cores this process may use, shared by this
    # node's ranks (LOCAL_WORLD_SIZE), less one for the training step, 1 to 16 (shard runs resume
    # exactly only with the same number: resume "auto" runs on the same kind of machine)
    num_workers: int | Literal["auto"] = 2
    shuffle_buffer: int = 1000  # shards
    on_error: Literal["raise", "skip"] = "raise"
    # a sample lacking some modality (folder: a file, shards: a key, captions: an empty image or
    # caption cell): "error" (bad data: a DataError naming the file and modality, or skipped under
    # on_error=skip), "skip" (left out and counted in data/skipped), "allow" (kept: the modality is
    # marked absent in the batch, gets no visible token and no loss; docs/data.md "Incomplete datasets")
    missing: Literal["error", "skip", "allow"] = "error"
    # the fast data path (folder / shards: Packed integer decoding + PairedTransform(fast=True)):
    # semseg bit for bit as the reference path, rgb within 1e-6, depth within 1e-6 of the reference
    # algorithm in float64 (the float32 reference: up to ~1e-4 from it); false: the reference
    fast_decode: bool = True
    # where the fast path decodes RGB JPEGs (folder / shards): "cpu" in the loader workers; "cuda":
    # the workers hand the bytes and crop boxes on, the training GPU decodes a batch at once (nvJPEG)
    decode: Literal["cpu", "cuda"] = "cpu"
    # text modality (M3AE)
    tokenizer: str = "synthetic"  # "synthetic" (built in, offline), or a tokenizer.json / BERT vocab.txt
    text_overflow: Literal["truncate", "error"] = "truncate"  # captions longer than max_len
    text_unk: Literal["keep", "error"] = "keep"  # out-of-vocabulary words: [UNK] or an error
    image_only: float = 0.0  # fraction of samples whose text is dropped (unpaired image data)
    text_only: float = 0.0  # fraction of samples whose images are dropped (unpaired text data)

    def __post_init__(self) -> None:
        from multimae.data.errors import check_missing

        check_missing(self.missing)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_samples is None and self.source == "synthetic":
            self.num_samples = SYNTHETIC_EPOCH
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"data.num_samples must be >= 1, got {self.num_samples}")


SYNTHETIC_EPOCH = 4096  # synthetic scenes per epoch unless data.num_samples says


def epoch_samples(data: DataConfig) -> tuple[int, str]:
    """Samples per epoch (all ranks) of ``data`` and where the number comes from, for the run log:
    ``data.num_samples`` when set, else (shards) the samples counted in the local shards of
    ``data.urls`` (tar headers only). Remote shards (``http://``, ``pipe:``) are not counted:
    :class:`~multimae.data.errors.DataError` asking for ``data.num_samples``."""
    if data.num_samples is not None:
        return data.num_samples, "data.num_samples"
    if data.source != "shards" or not data.urls:
        raise ValueError(f"data.num_samples is needed for data.source={data.source}")
    import os
    import tarfile

    from braceexpand import braceexpand

    from multimae.data.errors import DataError
    from multimae.data.shards import count_samples

    urls = [u for part in data.urls.split(",") for u in braceexpand(part.strip())] if "{" not in data.urls \
        else list(braceexpand(data.urls))
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise DataError(f"data.urls: {remote[0]} is remote and its samples are not counted; set data.num_samples "
                        "to the samples per epoch")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"data.urls: shard {missing[0]} not found" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    try:
        n = count_samples(urls)
    except (OSError, EOFError, tarfile.TarError) as e:
        raise DataError(f"data.urls: a shard is not a readable tar file ({e})") from None
    if n < 1:
        raise DataError(f"data.urls: the {len(urls)} shard(s) hold no samples")
    return n, f"counted in the {len(urls)} shard(s) of data.urls"


@dataclass
class MaskConfig:
    strategy: Literal["dirichlet", "ratio"] = "dirichlet"
    num_visible: int = 98  # MultiMAE: visible-token budget over all input modalities
    alpha: float = 1.0  # symmetric Dirichlet concentration (paper: 1.0)
    sample_subsets: bool = False  # pre-sample a random non-empty subset of modalities per sample
    # M3AE: mask ratio per modality; [lo, hi] draws one per sample uniformly from the range
    ratios: dict[str, float | tuple[float, float]] = field(default_factory=dict)
