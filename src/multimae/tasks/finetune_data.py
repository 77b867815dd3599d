"""Downstream data of a fine-tuning run: raw datasets per split, the resumable training loader and
the evaluation loader (see :mod:`multimae.data.transfer` for what a sample holds).

Sources: ``synthetic`` (scene streams disjoint from pretraining, fixed train / val / test splits),
``folder`` (``root/<split>/<modality>/<class or all>/<name>.<ext>``: ImageFolder-style
classification with the class directories under every modality, or dense tasks under ``all/``)
and ``shards`` (WebDataset tars; the label is the ``cls`` field). Bad input follows
``data.on_error`` like pretraining: a DataError naming the file, or skipped and counted.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from multimae.core.batch import Batch
from multimae.data import collate
from multimae.data.transfer import LABEL, TransferTransform, build_randaugment, target_spec
from multimae.data.errors import DataError
from multimae.data.loader import ResumableBatchSampler, SeededAugment, shard_urls, stack_modalities
from multimae.core.modalities import ModalitySpec
from multimae.data.sources import Request, get_source
from multimae.core.seeding import derive_seed
from multimae.tasks.transfer import Datasets
from multimae.tasks.finetune_config import FinetuneConfig, target_of

#: Tasks evaluated by letterboxing (resize longest side + pad) rather than a centre crop.
DENSE_KINDS = ("segmentation", "depth", "dense")


def task_target_spec(cfg: FinetuneConfig) -> ModalitySpec | None:
    """Spec of the target of ``cfg`` (None for an image-level label)."""
    enc = cfg.model.encoder
    return target_spec(target_of(cfg), cfg.model.head.kind, cfg.model.head.num_classes,
                       enc.modalities if enc is not None else None)


def _read_fields(inputs: Sequence[ModalitySpec], cfg: FinetuneConfig) -> list[Any]:
    """What a folder / shard reader must decode: the inputs and the target's raw field."""
    fields: list[Any] = list(inputs)
    spec = task_target_spec(cfg)
    if spec is None:
        fields.append(LABEL)
    elif spec.key not in {s.key for s in inputs}:
        if spec.kind == "categorical":  # ids outside [0, K) other than the ignore label: the reader's error
            spec = spec.with_(ignore_index=cfg.data.ignore_index)
        fields.append(spec.with_(standardize="none"))
    return fields


def raw_dataset(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], split: str, train: bool,
                datasets: Datasets | None = None) -> Dataset:
    """The untransformed map-style dataset of ``split``: ``datasets(split, train)`` when given,
    else the registered source's (:mod:`multimae.data.sources`)."""
    if datasets is not None:
        return datasets(split, train)
    source = get_source(cfg.data.source)
    if source.dataset is None:
        raise ValueError(f"data.source={cfg.data.source!r} streams (use shard_dataset)")
    return source.dataset(Request(cfg.data, _read_fields(inputs, cfg), split, train,
                                  classification=cfg.model.head.kind == "classification",
                                  num_classes=cfg.model.head.num_classes, required=required_keys(cfg, inputs)))


def required_keys(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec]) -> list[str]:
    """What a sample must have even under ``data.missing=allow``: the target (a dense one; the
    image-level label comes with every folder sample), and the inputs a dense head reads
    (``model.head.main_tasks``)."""
    spec = task_target_spec(cfg)
    keys = [spec.key] if spec is not None else []
    if cfg.model.head.kind != "classification":
        keys += [s.key for s in inputs if s.name in set(cfg.model.head.main_tasks) and s.key not in keys]
    return keys


def check_eval_data(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], datasets: Datasets | None = None) -> None:
    """Open the evaluation split a run will score (``data.eval_split``) before its first step, so that a
    missing or broken split fails at once, naming the directory or shard, not after training."""
    d, source = cfg.data, get_source(cfg.data.source)
    if datasets is not None:
        return
    if not source.streams:
        if source.open_to_check:
            raw_dataset(cfg, inputs, d.eval_split, train=False)
        return
    if not d.eval_urls:
        raise DataError("data.eval_urls must be set for data.source=shards (the split scored after training)")
    from braceexpand import braceexpand  # webdataset's own dependency

    urls = shard_urls(d.eval_urls)
    every = urls if isinstance(urls, list) else list(braceexpand(urls))
    missing = [u for u in every if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise DataError(f"data.eval_urls: shard {missing[0]} not found"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def shard_dataset(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], urls: str | None, transform: Any,
                  train: bool, rank: int = 0, world_size: int = 1) -> IterableDataset:
    """Samples streamed from WebDataset shards, transformed (training: shuffled, a fixed number
    of samples per rank; evaluation: one ordered pass on one process)."""
    from multimae.data.shards import ShardDataset

    d = cfg.data
    if not urls:
        raise DataError(f"data.{'train' if train else 'eval'}_urls must be set for data.source=shards")
    per_rank = (d.num_samples // world_size if d.num_samples else "auto") if train else None
    return ShardDataset(shard_urls(urls), _read_fields(inputs, cfg), transform=_Seeded(transform, cfg.train.seed),
                        shuffle_buffer=d.shuffle_buffer if train else 0, seed=cfg.train.seed, on_error=d.on_error,
                        rank=rank if train else 0, world_size=world_size if train else 1, samples_per_rank=per_rank,
                        missing=d.missing)


class _Seeded:
    """Streamed samples get a generator from (seed, epoch, key): reproducible augmentation."""

    def __init__(self, transform: Any, seed: int) -> None:
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample: dict) -> dict:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, sample.get("__key__", "")))
        return self.transform(sample, generator=g)


def build_transform(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], train: bool) -> TransferTransform:
    """Training (random crop, flip, RandAugment) or evaluation transform of ``cfg``'s task."""
    d, a = cfg.data, cfg.aug
    ra = None
    if train and a.randaugment:
        if "rgb" not in {s.key for s in inputs}:
            raise ValueError("aug.randaugment needs an rgb input")
        spatial = sum(1 for s in inputs if s.is_spatial)
        photometric = a.randaugment_space == "photometric" or (a.randaugment_space == "auto" and spatial > 1)
        ra = build_randaugment(a.randaugment_ops, a.randaugment_magnitude, photometric)
    if train and (a.color_jitter is not None or a.grayscale_prob > 0):
        if "rgb" not in {s.key for s in inputs}:
            raise ValueError("aug.color_jitter / aug.grayscale_prob need an rgb input")
        from torchvision.transforms import v2

        ops: list[Any] = [ra] if ra is not None else []
        if a.color_jitter is not None:
            if len(a.color_jitter) != 4:
                raise ValueError(f"aug.color_jitter={a.color_jitter}: expected [brightness, contrast, saturation, hue]")
            b, c, s_, h = (float(x) for x in a.color_jitter)
            ops.append(v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s_, hue=h)],
                                      p=a.color_jitter_prob))
        if a.grayscale_prob > 0:
            ops.append(v2.RandomGrayscale(p=a.grayscale_prob))
        ra = v2.Compose(ops)
    if not 0.0 < d.eval_crop_pct <= 1.0:
        raise ValueError(f"data.eval_crop_pct={d.eval_crop_pct}: must be in (0, 1]")
    letterbox = d.eval_transform == "letterbox" or (d.eval_transform == "auto" and cfg.model.head.kind in DENSE_KINDS)
    return TransferTransform(inputs, target_of(cfg), task_target_spec(cfg), d.image_size, train, d.crop_scale,
                             d.hflip, letterbox_eval=letterbox, ignore_index=d.ignore_index, randaugment=ra,
                             eval_crop_pct=d.eval_crop_pct, train_crop=d.train_crop,
                             allow_missing=d.missing == "allow", required=required_keys(cfg, inputs))


def collate_inputs(samples: list[dict], inputs: Sequence[ModalitySpec] = (), image_size: int = 0,
                   allow_missing: bool = False) -> Batch:
    """Stack samples into a Batch. An input modality some samples lack (``data.missing=allow``)
    becomes zeros there with ``Batch.present`` False (every input gets ``present`` under
    ``allow_missing``, so batches keep one structure): the transfer model leaves those tokens
    out of attention and pooling."""
    keys = [s.key for s in inputs]
    if not allow_missing and all(k in smp for smp in samples for k in keys):
        return Batch.of(collate(samples))
    tensors, present = stack_modalities(samples, inputs, image_size, allow_missing)
    rest = Batch.of(collate([{k: v for k, v in smp.items() if k not in tensors} for smp in samples]))
    return Batch({**rest.tensors, **tensors}, present=present, extra=rest.extra)


def train_collate(samples: list[dict], inputs: Sequence[ModalitySpec] = (), image_size: int = 0,
                  allow_missing: bool = False) -> tuple[Batch, None]:
    """Stack samples into a ``(Batch, None)`` micro-batch (no mask plan in fine-tuning)."""
    for s in samples:
        s.pop("__batch__", None)
    return collate_inputs(samples, inputs, image_size, allow_missing), None


def eval_collate(samples: list[dict | None], inputs: Sequence[ModalitySpec] = (), image_size: int = 0,
                 allow_missing: bool = False) -> Batch | None:
    """Stack evaluation samples into a Batch (tensors; ``__key__`` and other lists in ``extra``),
    leaving out skipped ones (None); None when all were."""
    present = [s for s in samples if s is not None]
    return collate_inputs(present, inputs, image_size, allow_missing) if present else None


class _StreamPosition:
    """The position of a streamed training set: its epoch (the shuffle and augmentation seed) and
    batches per epoch; streams restart an epoch from its beginning."""

    def __init__(self, dataset: Any, batches: int) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.dataset.set_epoch(epoch)


def build_train_loader(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], rank: int = 0, world_size: int = 1,
                       datasets: Datasets | None = None) -> tuple[DataLoader, Any]:
    """Training loader of ``(Batch, None)`` micro-batches and its position (``len()`` batches per
    rank per epoch, ``set_epoch(epoch, start_batch)``)."""
    d, t = cfg.data, cfg.train
    tf = build_transform(cfg, inputs, train=True)
    collate_fn = functools.partial(train_collate, inputs=list(inputs), image_size=d.image_size,
                                   allow_missing=d.missing == "allow")
    kw: dict[str, Any] = dict(num_workers=d.num_workers, collate_fn=collate_fn, persistent_workers=False,
                              pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(t.seed),
                              prefetch_factor=4 if d.num_workers > 0 else None)
    if datasets is None and get_source(d.source).streams:
        ds = shard_dataset(cfg, inputs, d.train_urls, tf, True, rank, world_size)
        per_rank = len(ds)  # type: ignore[arg-type]
        if per_rank < t.batch_size:
            raise DataError(f"{per_rank} training samples per rank are fewer than one batch of {t.batch_size}")
        return DataLoader(ds, batch_size=t.batch_size, drop_last=True, **kw), _StreamPosition(ds, per_rank // t.batch_size)
    base = raw_dataset(cfg, inputs, d.train_split, train=True, datasets=datasets)
    sampler = ResumableBatchSampler(len(base), t.batch_size, t.seed, rank, world_size)  # type: ignore[arg-type]
    return DataLoader(SeededAugment(base, tf, t.seed), batch_sampler=sampler, **kw), sampler


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict | None:
        sample = _scored_once(self.base, i)
        if sample is None:
            return None
        return self.transform(sample, generator=torch.Generator().manual_seed(derive_seed(i)))


def _scored_once(base: Any, i: int) -> dict | None:
    """Sample ``i`` of ``base`` for evaluation; under ``on_error=skip`` a bad sample is None
    (counted, logged, left out), never replaced by another one that would be scored twice."""
    while isinstance(base, Subset):
        base, i = base.dataset, base.indices[i]
    load, policy = getattr(base, "load", None), getattr(base, "policy", None)
    if load is None or policy is None or getattr(base, "transform", None) is not None:
        return base[i]
    try:
        return load(i)
    except DataError as err:
        policy.handle(err)  # raises under on_error=raise
        return None


class _Present:
    """Iterate a loader leaving out the batches whose samples were all skipped."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        return (b for b in self.loader if b is not None)


def build_eval_loader(cfg: FinetuneConfig, inputs: Sequence[ModalitySpec], split: str | None = None,
                      train_split_stats: bool = False, limit: int | None = None,
                      datasets: Datasets | None = None) -> Iterable[Batch]:
    """Deterministic loader over ``split`` (default ``data.eval_split``) with the evaluation transform,
    in dataset order; ``train_split_stats`` reads the training split instead (for baselines)."""
    d = cfg.data
    split = d.train_split if train_split_stats else (split or d.eval_split)
    tf = build_transform(cfg, inputs, train=False)
    if datasets is None and get_source(d.source).streams:
        ds: Any = shard_dataset(cfg, inputs, d.train_urls if train_split_stats else d.eval_urls, tf, False)
    else:
        base = raw_dataset(cfg, inputs, split, train=False, datasets=datasets)
        if limit is not None and len(base) > limit:  # type: ignore[arg-type]
            base = torch.utils.data.Subset(base, range(limit))
        ds = _Transformed(base, tf)
    return _Present(DataLoader(ds, batch_size=cfg.train.eval_batch_size, shuffle=False, num_workers=d.num_workers,
                               collate_fn=functools.partial(eval_collate, inputs=list(inputs), image_size=d.image_size,
                                                            allow_missing=d.missing == "allow")))
