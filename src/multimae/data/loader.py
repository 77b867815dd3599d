"""The loader: datasets -> paired transform -> collation + a :class:`MaskPlan` per batch.

Every batch of every source is identified by ``(epoch, rank, worker, batch index)`` and
everything random about it -- which samples, their crops and flips, its MaskPlan -- is a pure
function of the run seed and those numbers (:func:`multimae.core.seeding.derive_seed`), never of
worker scheduling. So an interrupted run resumed from a checkpoint sees exactly the batches and
masks it would have seen, for map-style datasets and for streamed shards alike.

* Map-style data (synthetic, folder, captions): :class:`ResumableBatchSampler` draws the
  rank's batches from a per-epoch permutation; the batch index ``k`` is unique per rank, so
  the worker part of the key is 0 (the result does not depend on ``num_workers``).
* Streams (WebDataset shards): :class:`StreamBatches` forms batches inside the workers; batch
  ``k`` of an epoch is read by logical worker ``k % num_workers`` from that worker's shards
  and shuffle buffer (seeded per epoch, rank and worker), so the result depends on
  ``num_workers`` and a run must resume with the same value.

This module knows the model only through a :class:`BatchSpec` (which modalities a batch must
hold, the patch size); it never imports the model, ``training/`` or ``viz``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from multimae.core.batch import Batch
from multimae.data.config import DataConfig, MaskConfig, epoch_samples
from multimae.data.errors import DataError
from multimae.core.masking import MaskPlan, dirichlet_plan, ratio_plan
from multimae.core.modalities import ModalitySpec
from multimae.core.seeding import generator as seeded


BATCH_TAG = "__batch__"  # (epoch, worker, batch index) carried by every sample into the collator


@dataclass(frozen=True)
class BatchSpec:
    """What a batch must hold for one model.

    inputs: the encoder's input modalities, in encoder order (masked by the plan).
    specs: every modality whose tensor the data provides (inputs, then targets not read from one).
    patch_size: the model's patch size (token counts); image_size: the model's native image side.
    """

    inputs: tuple[ModalitySpec, ...]
    specs: tuple[ModalitySpec, ...]
    patch_size: int
    image_size: int

    @classmethod
    def of(cls, model: Any) -> "BatchSpec":
        """The spec of a model with ``input_specs`` / ``output_specs`` dicts and a ``config``."""
        specs = {s.key: s for s in model.input_specs.values()}
        for s in model.output_specs.values():
            specs.setdefault(s.key, s)
        return cls(tuple(model.input_specs.values()), tuple(specs.values()), int(model.config.patch_size),
                   int(model.config.image_size))


class ResumableBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Per-rank batches of ``(epoch, step_in_epoch, index)`` from a seeded per-epoch permutation.

    Every rank gets ``len(self)`` batches per epoch (the permutation is cut to a multiple of
    world_size * batch_size), as DDP requires. ``start`` skips batches already trained on.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.bs, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world_size
        if len(self) == 0:
            raise ValueError(f"{num_samples} samples are too few for batch {batch_size} x {world_size} rank(s)")
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.n // (self.bs * self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = seeded(self.seed, "order", self.epoch)
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.bs * self.world]
        mine = perm[self.rank::self.world].tolist()
        for s in range(self.start, len(self)):
            yield [(self.epoch, s, i) for i in mine[s * self.bs:(s + 1) * self.bs]]


class SeededAugment(Dataset):
    """Wraps a raw dataset; item ``(epoch, step, index)`` -> transformed sample whose random
    crop/flip come from a generator seeded by (seed, epoch, index), tagged with its batch."""

    def __init__(self, base: Dataset, transform: Any, seed: int, unpaired: "Unpairing | None" = None) -> None:
        self.base, self.transform, self.seed, self.unpaired = base, transform, seed, unpaired

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, step, index = key
        sample = self._transformed(epoch, index)
        if self.unpaired is not None:
            self.unpaired(sample, seeded(self.seed, "unpair", index))
        sample[BATCH_TAG] = (epoch, 0, step)
        return sample

    def _transformed(self, epoch: int, index: int) -> dict[str, Any]:
        """The transformed sample ``index``. A DataError of the transform (a bad sample the reader
        could not see) follows the dataset's ``on_error`` policy like the reader's own errors:
        raised, or counted and replaced by the next sample."""
        policy = getattr(self.base, "policy", None)
        at_epoch = getattr(self.base, "item_at_epoch", None)  # e.g. a caption drawn per epoch
        n = len(self.base)  # type: ignore[arg-type]
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                raw = at_epoch(i, epoch) if at_epoch is not None else self.base[i]
                return self.transform(raw, generator=seeded(self.seed, "augment", epoch, i))
            except DataError as err:
                if policy is None:
                    raise
                policy.handle(err)
        raise DataError(f"every one of the {n} samples is bad")


@dataclass
class Unpairing:
    """Turns a fixed fraction of paired samples into image-only or text-only ones (by a seed per
    sample index), to train on unpaired data mixed into the stream. Dropped keys contribute no
    tokens and no loss downstream (``Batch.present[key]`` False)."""

    text_keys: Sequence[str]
    image_keys: Sequence[str]
    image_only: float = 0.0
    text_only: float = 0.0

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> None:
        u = torch.rand(1, generator=generator).item()
        drop = self.text_keys if u < self.image_only else \
            self.image_keys if u < self.image_only + self.text_only else ()
        for k in drop:
            sample.pop(k, None)


class CachedDataset(Dataset):
    """Materialises a dataset's samples once (e.g. rendered synthetic scenes) and serves copies."""

    def __init__(self, base: Dataset) -> None:
        self.items = [base[i] for i in range(len(base))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return dict(self.items[i])


def _fill_absent_valid(samples: list[dict[str, Any]], specs: Any) -> None:
    """A raster's valid-pixel map (``<key>.valid``) for the samples lacking that raster
    (``data.missing=allow``): all invalid, shaped as the others' -- the sample is absent there anyway
    (``Batch.present``), and every sample of a batch must hold the same keys to collate."""
    from multimae.data.transforms import valid_key

    for spec in specs:
        vk = valid_key(spec.key)
        ref = next((smp[vk] for smp in samples if vk in smp), None)
        if ref is not None:
            for smp in samples:
                if vk not in smp:
                    smp[vk] = torch.zeros_like(ref)


def raster_padding(batch: Batch, specs: Any, patch_size: int) -> Batch:
    """``batch`` with ``pad[key]`` (B, N) set for each raster whose valid-pixel map
    (``<key>.valid``, from the transforms) leaves a patch without any valid pixel: such a patch
    (all nodata) does not exist for the model -- never visible, never in the loss."""
    from multimae.data.transforms import valid_key

    for spec in specs:
        vk = valid_key(spec.key)
        if not spec.is_raster or vk not in batch.extra or spec.key in batch.pad:
            continue
        valid = batch.extra[vk]
        p = spec.patch(patch_size)
        B, _, H, W = valid.shape
        any_valid = valid.reshape(B, H // p, p, W // p, p).any(4).any(2).reshape(B, -1)
        if not bool(any_valid.all()):
            batch.pad[spec.key] = ~any_valid
    return batch


@dataclass
class MaskCollator:
    """Stacks samples into a :class:`~multimae.core.batch.Batch` and draws its MaskPlan.

    ``spec``: what the batch holds for the model (its keys become modality tensors, every other
    field goes to ``Batch.extra``). Every sample carries the batch's ``__batch__`` tag
    ``(epoch, worker, index)``; the plan is drawn from a generator seeded by
    (seed, epoch, rank, worker, index). Returns ``(batch, plan)``.
    """

    spec: BatchSpec
    mask: MaskConfig
    seed: int
    rank: int = 0
    text: Any = None  # a multimae.data.text.TextCollator when a text modality is used
    #: ``data.missing == "allow"``: every modality key gets ``Batch.present`` (a batch's structure
    #: is then the same whichever samples lack what). Otherwise only a key some sample lacks does.
    allow_missing: bool = False
    image_size: int | None = None  # the transformed side (zeros for a key no sample has); None: spec's

    def plan(self, batch: Batch, generator: torch.Generator) -> MaskPlan:
        """The MaskPlan of the batch's input modalities; padding and absent samples never visible."""
        specs = [s for s in self.spec.inputs if s.key in batch]
        counts = {s.name: s.num_tokens(batch[s.key].shape, self.spec.patch_size) for s in specs}
        valid = {s.name: ~batch.pad[s.key] for s in specs if s.key in batch.pad}
        present = {s.name: batch.present[s.key] for s in specs if s.key in batch.present}
        if self.mask.strategy == "ratio":
            return ratio_plan(counts, batch.size, self.mask.ratios, generator, valid=valid, present=present)
        return dirichlet_plan(counts, batch.size, self.mask.num_visible, self.mask.alpha, generator=generator,
                              present=present, valid=valid, sample_subsets=self.mask.sample_subsets)

    def collate(self, samples: list[dict[str, Any]]) -> Batch:
        """Samples -> Batch (text: tokenised with padding and presence)."""
        if self.text is not None:
            return self.text(samples)
        from multimae.data import collate
        from multimae.data.device_decode import DEFERRED, gather_deferred

        deferred = gather_deferred(samples)  # data.decode=cuda: JPEGs left to the device
        _fill_absent_valid(samples, self.spec.specs)
        tensors, present = stack_modalities(samples, self.spec.specs, self.image_size or self.spec.image_size,
                                            self.allow_missing)
        extra = collate([{k: v for k, v in smp.items() if k not in tensors} for smp in samples])
        if deferred:
            extra[DEFERRED] = deferred
        return raster_padding(Batch(tensors, present=present, extra=extra), self.spec.specs, self.spec.patch_size)

    def __call__(self, samples: list[dict[str, Any]]) -> tuple[Batch, MaskPlan]:
        tags = {s.pop(BATCH_TAG, None) for s in samples}
        if len(tags) != 1 or None in tags:
            raise ValueError(f"MaskCollator: the samples of one batch must carry one {BATCH_TAG!r} tag "
                             f"(epoch, worker, index), got {sorted(map(str, tags))}")
        epoch, worker, index = tags.pop()
        batch = self.collate(samples)
        return batch, self.plan(batch, seeded(self.seed, "mask", epoch, self.rank, worker, index))



def stack_modalities(samples: list[dict[str, Any]], specs: Sequence[ModalitySpec], image_size: int,
                     allow_missing: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The modality tensors of transformed samples, stacked, and their presence: a sample lacking
    a modality gets zeros of the right shape there (:func:`absent_field`) and ``present[key]``
    (B,) False. ``allow_missing``: every modality gets ``present`` (every batch has the same
    structure); otherwise only one some sample lacks. Returns ``(tensors, present)``; a modality
    no sample has and that has no fixed shape (text) is left out."""
    from multimae.data import stack_present

    tensors, present = {}, {}
    for spec in {s.key: s for s in specs}.values():
        got = stack_present(samples, spec.key, absent_field(spec, image_size))
        if got is not None:
            tensors[spec.key], flags = got
            if allow_missing or not all(spec.key in smp for smp in samples):
                present[spec.key] = flags
    return tensors, present


def absent_field(spec: ModalitySpec, image_size: int) -> torch.Tensor | None:
    """The zeros standing for a modality a sample lacks, shaped as a transformed one
    (:class:`~multimae.data.transforms.PairedTransform`): float (C, S/stride, S/stride), or int64
    (S/stride, S/stride) class ids; None for text (the text collator pads it)."""
    if not spec.is_spatial:
        return None
    side = image_size // spec.stride
    if spec.kind == "categorical":
        return torch.zeros(side, side, dtype=torch.int64)
    return torch.zeros(spec.channels, side, side)


#: Offset of the synthetic held-out scenes' stream from the training seed.
HELD_OUT_OFFSET = 10_000


def held_out_seed(seed: int) -> int:
    """The seed of a pretraining run's held-out synthetic scenes (its end-of-run evaluation, the
    demo's scenes): ``train.seed + HELD_OUT_OFFSET``."""
    return seed + HELD_OUT_OFFSET

def resolve_image_size(data: DataConfig, spec: BatchSpec) -> DataConfig:
    """``data`` with ``image_size`` taken from the model's when left None (a copy); a value set on
    purpose is kept (the model resamples its position tables to other sizes)."""
    return data if data.image_size is not None else replace(data, image_size=spec.image_size)


def shard_urls(urls: str) -> str | list[str]:
    """``data.urls``: a brace pattern stays as it is; a comma list becomes a list of paths."""
    return [u.strip() for u in urls.split(",") if u.strip()] if "," in urls and "{" not in urls else urls


def build_dataset(data: DataConfig, specs: Sequence[ModalitySpec], seed: int, *, train: bool = True,
                  packed: bool = False) -> Dataset | None:
    """The raw (untransformed) dataset a DataConfig describes; ``train=False``: its validation data
    (a folder dataset without any: None, see :func:`multimae.data.folder.open_folder`).
    ``packed``: a folder yields :class:`~multimae.data.codecs.Packed` fields, for a
    ``PairedTransform(fast=True)``."""
    names = sorted({s.key for s in specs})
    if data.source == "synthetic":
        from multimae.data.synthetic import SyntheticScenes

        if data.image_size is None:
            raise ValueError("data.image_size is None: set it, or take the model's with resolve_image_size")

        n = data.num_samples if train else data.val_samples
        ds: Dataset = SyntheticScenes(n, image_size=data.image_size, seed=seed if train else held_out_seed(seed),
                                      modalities=names)
        return CachedDataset(ds) if data.cache else ds
    if data.source == "folder":
        from multimae.data.folder import open_folder

        if not data.root:
            raise ValueError("data.root must be set for data.source=folder")
        return open_folder(data.root, data.split, specs, val_split=data.val_split, val_fraction=data.val_fraction,
                           train=train, on_error=data.on_error, packed=packed, missing=data.missing)
    if data.source == "captions":
        from multimae.data.text import CaptionTable

        if not data.root:
            raise ValueError("data.root must name the CSV/TSV caption table for data.source=captions")
        return CaptionTable(data.root, image_root=data.image_root, on_error=data.on_error, seed=seed,
                            missing=data.missing)
    raise ValueError(f"data.source={data.source!r} is not a map-style dataset (shards stream instead)")


def resolve_workers(num_workers: int | str, cores: int | None = None, local_ranks: int | None = None) -> int:
    """``data.num_workers`` as a number: itself, or for ``"auto"`` the cores this process may use
    (``cores``, default its CPU affinity) divided among this node's ranks (``local_ranks``, default
    ``LOCAL_WORLD_SIZE``), less one core for the training step, clamped to 1..16."""
    if num_workers != "auto":
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a number >= 0 or 'auto', got {num_workers!r}")
        return num_workers
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cores // max(1, local_ranks) - 1))


def build_loader(data: DataConfig, mask: MaskConfig, spec: BatchSpec, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, decode_device: torch.device | str | None = None,
                 ) -> tuple[Any, "ResumableBatchSampler | StreamBatches"]:
    """Training DataLoader yielding ``(batch, plan)``, and its position: an object with
    ``len()`` (batches per epoch and rank) and ``set_epoch(epoch, start_batch)``, to be called
    before every epoch (a :class:`ResumableBatchSampler`, or the :class:`StreamBatches`).

    ``data.decode=cuda`` (folder / shards with ``data.fast_decode``): RGB JPEGs are decoded on the
    current CUDA device in the main process (:mod:`multimae.data.device_decode`; the loader is a
    :class:`~multimae.data.device_decode.DeviceDecodeLoader` and a batch's rgb arrives on the
    device). ``decode_device`` overrides that device (tests run the same path on the CPU)."""
    from multimae.data.transforms import PairedTransform

    data = resolve_image_size(data, spec)
    device = _decode_device(data, decode_device)
    specs = list(spec.specs)
    allow = data.missing == "allow"
    collator = MaskCollator(spec, mask, seed, rank, text=text_collator(data, specs), allow_missing=allow,
                            image_size=data.image_size)
    transform = PairedTransform(specs, data.image_size, train=True, scale=tuple(data.crop_scale), hflip=data.hflip,
                                fast=data.fast_decode, allow_missing=allow)
    unpaired = None
    if data.image_only or data.text_only:
        unpaired = Unpairing([s.key for s in specs if s.kind == "text"], [s.key for s in specs if s.is_spatial],
                             data.image_only, data.text_only)
    packing: bool | str = "encoded" if device is not None else data.fast_decode
    workers = resolve_workers(data.num_workers)
    kw: dict[str, Any] = dict(num_workers=workers, collate_fn=collator, prefetch_factor=4 if workers > 0 else None,
                              persistent_workers=False, pin_memory=torch.cuda.is_available(),
                              generator=torch.Generator().manual_seed(seed))  # never draws from the global RNG
    if data.source == "shards":
        from multimae.data.shards import ShardDataset

        if not data.urls:
            raise ValueError("data.urls must be set for data.source=shards")
        stream = ShardDataset(shard_urls(data.urls), specs, shuffle_buffer=data.shuffle_buffer,
                              seed=seed, on_error=data.on_error, rank=rank, world_size=world_size,
                              packed=packing, missing=data.missing)
        n, how = epoch_samples(data)
        per_rank = n // (world_size * batch_size)  # batches per rank and epoch
        if per_rank < 1:
            raise DataError(f"an epoch of {n} samples ({how}) is less than one batch of {batch_size} x "
                            f"{world_size} rank(s)")
        position: Any = StreamBatches(stream, transform, batch_size, per_rank, seed, unpaired)
        loader = DataLoader(position, batch_size=None, **kw)
    else:
        base = build_dataset(data, specs, seed, packed=packing)
        position = ResumableBatchSampler(len(base), batch_size, seed, rank, world_size)  # type: ignore[arg-type]
        loader = DataLoader(SeededAugment(base, transform, seed, unpaired), batch_sampler=position, **kw)
    if device is None:
        return loader, position
    from multimae.data.device_decode import DeviceDecodeLoader

    return DeviceDecodeLoader(loader, device), position


def _decode_device(data: DataConfig, override: torch.device | str | None) -> torch.device | None:
    """Where ``data.decode`` decodes JPEGs: None (the workers, on the CPU), or a device."""
    if data.decode not in ("cpu", "cuda"):
        raise ValueError(f"data.decode must be 'cpu' or 'cuda', got {data.decode!r}")
    if data.decode == "cpu" and override is None:
        return None
    if data.source not in ("folder", "shards") or not data.fast_decode:
        raise ValueError(f"data.decode={data.decode} decodes the JPEGs of folder and shard sources on the fast path "
                         f"(data.fast_decode=true); this run has data.source={data.source}, "
                         f"data.fast_decode={data.fast_decode}: set data.decode=cpu")
    if override is not None:
        return torch.device(override)
    if not torch.cuda.is_available():
        raise ValueError("data.decode=cuda needs a CUDA device (torch.cuda.is_available() is False); "
                         "set data.decode=cpu")
    return torch.device("cuda", torch.cuda.current_device())


class StreamBatches(IterableDataset):
    """Batches of one rank's sample stream (a :class:`~multimae.data.shards.ShardDataset`).

    An epoch has ``batches`` batches per rank. Batch ``k`` belongs to logical worker
    ``k % num_workers``, which reads its own shards with its own shuffle buffer
    (``stream.samples(epoch, worker, num_workers)``); sample ``i`` of the batch is transformed
    with a generator seeded by (seed, epoch, rank, worker, k, i). Each item is a list of
    transformed samples tagged ``(epoch, worker, k)``, for :class:`MaskCollator`.

    ``set_epoch(epoch, start)`` resumes at batch ``start``: DataLoader worker ``w`` then plays
    logical worker ``(w + start) % num_workers`` (the DataLoader hands out batches round-robin
    from worker 0), and every worker passes over the samples its earlier batches took before
    decoding them. Needs the same ``num_workers`` as the interrupted run.
    """

    def __init__(self, stream: Any, transform: Any, batch_size: int, batches: int, seed: int,
                 unpaired: Unpairing | None = None) -> None:
        self.stream, self.transform, self.bs, self.batches = stream, transform, batch_size, batches
        self.seed, self.unpaired = seed, unpaired
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (worker + self.start) % workers
        mine = range(logical, self.batches, workers)  # this logical worker's batches, whole epoch
        done = sum(1 for k in mine if k < self.start)
        samples = self.stream.samples(self.epoch, logical, workers, count=len(mine) * self.bs, skip=done * self.bs)
        rank = self.stream.rank
        for k in mine[done:]:
            batch = []
            for i in range(self.bs):
                g = seeded(self.seed, "augment", self.epoch, rank, logical, k, i)
                smp = self.transform(next(samples), generator=g)
                if self.unpaired is not None:
                    self.unpaired(smp, seeded(self.seed, "unpair", self.epoch, rank, logical, k, i))
                smp[BATCH_TAG] = (self.epoch, logical, k)
                batch.append(smp)
            yield batch


def eval_batches(spec: BatchSpec, data: DataConfig, mask: MaskConfig, seed: int, batch_size: int = 16,
                 limit: int | None = None) -> list[tuple[Batch, MaskPlan]]:
    """Held-out ``(batch, plan)`` pairs: the validation scenes (synthetic: another seed; folder:
    the configured split) with deterministic resizing and fixed-seed masks (``seed + 1``)."""
    from multimae.data.transforms import PairedTransform

    data = resolve_image_size(data, spec)
    specs = list(spec.specs)
    if data.source in ("synthetic", "folder"):  # folder: the val split, or the slice of train held out
        base = build_dataset(data, specs, seed, train=False)
        if base is None:  # a folder without validation data: no batches
            return []
    else:  # streamed shards / caption tables: the first samples of the data (not held out)
        from itertools import islice

        if data.source == "shards":
            from multimae.data.shards import ShardDataset

            stream = ShardDataset(shard_urls(data.urls), specs, shuffle_buffer=0, rank=0, world_size=1,
                                  missing=data.missing)
        else:
            stream = build_dataset(data, specs, seed)
        base = list(islice(iter(stream), limit or data.val_samples))
    allow = data.missing == "allow"
    transform = PairedTransform(specs, data.image_size, train=False, allow_missing=allow)
    n = len(base) if limit is None else min(limit, len(base))
    collator = MaskCollator(spec, mask, seed + 1, text=text_collator(data, specs), allow_missing=allow,
                            image_size=data.image_size)
    out = []
    # every sample, in batches of near-equal size (24 at batch 16: 12 + 12; no batch of one, whose
    # per-batch baselines would be trivial)
    k = -(-n // batch_size)
    bounds = [i * n // k for i in range(k + 1)] if n else []
    for s, e in zip(bounds, bounds[1:]):
        samples = [transform(base[i]) for i in range(s, e)]
        for smp in samples:
            smp[BATCH_TAG] = (0, 0, s)
        out.append(collator(samples))
    return out


def data_counts(dataset: Any) -> dict[str, int]:
    """Bad samples skipped and invalid pixels (NaN/inf set to 0) so far, from the raw dataset under
    a loader's wrappers (``.base`` / ``.stream`` / ``.dataset``), summed over worker processes:
    ``{"data/skipped": n, "data/invalid_pixels": m}``; {} for sources that count neither."""
    for ds in _unwrapped(dataset):
        policy = getattr(ds, "policy", None)
        if policy is not None and hasattr(policy, "invalid_pixels"):
            return {"data/skipped": policy.skipped, "data/invalid_pixels": policy.invalid_pixels}
    return {}


def coverage_line(dataset: Any) -> str | None:
    """One line saying how many of the samples found have each modality, for a folder dataset
    under a loader's wrappers where some lack one (None otherwise)."""
    from multimae.data.errors import coverage_lines

    for ds in _unwrapped(dataset):
        coverage, listed = getattr(ds, "coverage", None), getattr(ds, "listed", None)
        if coverage is not None and listed is not None:
            if all(n == listed for n in coverage.values()):
                return None
            return (f"data: {listed} samples found, {len(ds)} used (data.missing={ds.missing}); "
                    f"coverage {', '.join(coverage_lines(coverage, listed))}")
    return None


def _unwrapped(dataset: Any) -> Iterator[Any]:
    """``dataset`` and the datasets under its wrappers (``.base`` / ``.stream`` / ``.dataset``), at most 8 deep."""
    for _ in range(8):
        if dataset is None:
            return
        yield dataset
        dataset = next((getattr(dataset, a) for a in ("base", "stream", "dataset") if hasattr(dataset, a)), None)


def text_collator(data: DataConfig, specs: Sequence[ModalitySpec]) -> Any:
    """The TextCollator for the text modality among ``specs`` (None without one)."""
    text = [s for s in specs if s.kind == "text"]
    if not text:
        return None
    if len(text) > 1:
        raise ValueError(f"one text modality per model is supported, got {[s.name for s in text]}")
    from multimae.data.text import TextCollator
    from multimae.data.tokenizers import TextEncoder

    enc = TextEncoder(load_text_tokenizer(data.tokenizer), max_len=text[0].max_len, overflow=data.text_overflow,
                      unk=data.text_unk)
    images = [s for s in specs if s.is_spatial]
    shapes = {s.key: tuple(absent_field(s, data.image_size).shape) for s in images} if data.image_size else None
    return TextCollator(enc, text_key=text[0].key, image_keys=[s.key for s in images], image_shapes=shapes)


def load_text_tokenizer(name: str) -> Any:
    """The built-in synthetic tokenizer (``"synthetic"``) or one loaded from a file."""
    from multimae.data.tokenizers import default_synthetic_tokenizer, load_tokenizer

    return default_synthetic_tokenizer() if name == "synthetic" else load_tokenizer(name)
