"""The loader: datasets -> paired transform -> collation + a :class:`MaskPlan` per batch.

Everything random is a function of (run seed, epoch, rank, step), never of worker scheduling,
so an interrupted run resumed from a checkpoint sees exactly the batches and masks it would
have seen. This module knows the model only through a :class:`BatchSpec` (which modalities an
input batch must hold, the patch size); it never imports the model, ``training/`` or ``viz``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from multimae.data.config import DataConfig, MaskConfig
from multimae.masking import MaskPlan, dirichlet_plan, ratio_plan
from multimae.modalities import ModalitySpec


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        h ^= h >> 31
    return h & (2**63 - 1)


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
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.bs * self.world]
        mine = perm[self.rank::self.world].tolist()
        for s in range(self.start, len(self)):
            yield [(self.epoch, s, i) for i in mine[s * self.bs:(s + 1) * self.bs]]


class SeededAugment(Dataset):
    """Wraps a raw dataset; item ``(epoch, step, index)`` -> transformed sample whose random
    crop/flip come from a generator seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Any, seed: int, unpaired: "Unpairing | None" = None) -> None:
        self.base, self.transform, self.seed, self.unpaired = base, transform, seed, unpaired

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, step, index = key
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        sample = self.transform(self.base[index], generator=g)
        if self.unpaired is not None:
            self.unpaired(sample, mix_seed(self.seed, index, 11))
        sample["__step__"] = (epoch, step)
        return sample


@dataclass
class Unpairing:
    """Turns a fixed fraction of paired samples into image-only or text-only ones (by a seed per
    sample index), to train on unpaired data mixed into the stream. Dropped keys contribute no
    tokens and no loss downstream (``<key>_present`` False)."""

    text_keys: Sequence[str]
    image_keys: Sequence[str]
    image_only: float = 0.0
    text_only: float = 0.0

    def __call__(self, sample: dict[str, Any], seed: int) -> None:
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
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


@dataclass
class MaskCollator:
    """Stacks samples into a batch and draws its MaskPlan.

    ``input_specs``: the model's input modalities; ``patch_size``: the model's patch size.
    Returns ``(batch, plan)``.
    """

    input_specs: Sequence[ModalitySpec]
    patch_size: int
    mask: MaskConfig
    seed: int
    rank: int = 0
    text: Any = None  # a multimae.data.text.TextCollator when a text modality is used

    def token_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        counts = {}
        for s in self.input_specs:
            t = batch.get(s.key)
            if not isinstance(t, Tensor):
                continue
            if s.kind == "text":
                counts[s.name] = t.shape[1]
            else:
                h, w = t.shape[-2] * s.stride, t.shape[-1] * s.stride
                counts[s.name] = (h // self.patch_size) * (w // self.patch_size)
        return counts

    def plan(self, batch: dict[str, Any], generator: torch.Generator) -> MaskPlan:
        counts = self.token_counts(batch)
        B = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
        valid = {s.name: ~batch[f"{s.key}_pad"] for s in self.input_specs if f"{s.key}_pad" in batch and s.name in counts}
        present = {s.name: batch[f"{s.key}_present"] for s in self.input_specs
                   if f"{s.key}_present" in batch and s.name in counts}
        if self.mask.strategy == "ratio":
            return ratio_plan(counts, B, self.mask.ratios, generator, valid=valid, present=present)
        return dirichlet_plan(counts, B, self.mask.num_visible, self.mask.alpha, generator, present=present,
                              valid=valid, sample_subsets=self.mask.sample_subsets)

    def __call__(self, samples: list[dict[str, Any]]) -> tuple[dict[str, Any], MaskPlan]:
        from multimae.data import collate

        epoch, step = samples[0].pop("__step__", (0, 0))
        for s in samples[1:]:
            s.pop("__step__", None)
        batch = self.text(samples) if self.text is not None else collate(samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank, 7))
        return batch, self.plan(batch, g)


def shard_urls(urls: str) -> str | list[str]:
    """``data.urls``: a brace pattern stays as it is; a comma list becomes a list of paths."""
    return urls.split(",") if "," in urls and "{" not in urls else urls


def build_dataset(data: DataConfig, specs: Sequence[ModalitySpec], seed: int, *, train: bool = True) -> Dataset | None:
    """The raw (untransformed) dataset a DataConfig describes; ``train=False``: its validation data
    (a folder dataset without any: None, see :func:`multimae.data.folder.open_folder`)."""
    names = sorted({s.key for s in specs})
    if data.source == "synthetic":
        from multimae.data.synthetic import SyntheticScenes

        n = data.num_samples if train else data.val_samples
        ds: Dataset = SyntheticScenes(n, image_size=data.image_size, seed=seed if train else seed + 10_000,
                                      modalities=names)
        return CachedDataset(ds) if data.cache else ds
    if data.source == "folder":
        from multimae.data.folder import open_folder

        if not data.root:
            raise ValueError("data.root must be set for data.source=folder")
        return open_folder(data.root, data.split, specs, val_split=data.val_split, val_fraction=data.val_fraction,
                           train=train, on_error=data.on_error)
    if data.source == "captions":
        from multimae.data.text import CaptionTable

        if not data.root:
            raise ValueError("data.root must name the CSV/TSV caption table for data.source=captions")
        return CaptionTable(data.root, image_root=data.image_root, on_error=data.on_error)
    raise ValueError(f"data.source={data.source!r} is not a map-style dataset (shards stream instead)")


def build_loader(data: DataConfig, mask: MaskConfig, spec: BatchSpec, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1) -> tuple[DataLoader, ResumableBatchSampler | None]:
    """Training DataLoader yielding ``(batch, plan)`` and its resumable sampler (None for shards)."""
    from multimae.data.transforms import PairedTransform

    specs = list(spec.specs)
    collator = MaskCollator(list(spec.inputs), spec.patch_size, mask, seed, rank, text=text_collator(data, specs))
    transform = PairedTransform(specs, data.image_size, train=True, scale=tuple(data.crop_scale), hflip=data.hflip)
    unpaired = None
    if data.image_only or data.text_only:
        unpaired = Unpairing([s.key for s in specs if s.kind == "text"], [s.key for s in specs if s.is_spatial],
                             data.image_only, data.text_only)
    kw: dict[str, Any] = dict(num_workers=data.num_workers, collate_fn=collator,
                              persistent_workers=False, pin_memory=torch.cuda.is_available(),
                              generator=torch.Generator().manual_seed(seed))  # never draws from the global RNG
    if data.num_workers > 0:
        kw["prefetch_factor"] = 4
    if data.source == "shards":
        from multimae.data.shards import ShardDataset

        if not data.urls:
            raise ValueError("data.urls must be set for data.source=shards")
        per_rank = data.num_samples // world_size
        ds = ShardDataset(shard_urls(data.urls), specs, transform=_StepTagger(transform),
                          shuffle_buffer=data.shuffle_buffer, seed=seed, on_error=data.on_error, rank=rank,
                          world_size=world_size, samples_per_rank=per_rank - per_rank % batch_size)
        return DataLoader(ds, batch_size=batch_size, drop_last=True, **kw), None
    base = build_dataset(data, specs, seed)
    sampler = ResumableBatchSampler(len(base), batch_size, seed, rank, world_size)  # type: ignore[arg-type]
    return DataLoader(SeededAugment(base, transform, seed, unpaired), batch_sampler=sampler, **kw), sampler


class _StepTagger:
    """Transform wrapper for streamed shards (their randomness comes from the shard shuffle)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        self.count = 0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = self.transform(sample)
        out["__step__"] = (0, self.count)
        self.count += 1
        return out


def eval_batches(spec: BatchSpec, data: DataConfig, mask: MaskConfig, seed: int, batch_size: int = 16,
                 limit: int | None = None) -> list[tuple[dict[str, Any], MaskPlan]]:
    """Held-out ``(batch, plan)`` pairs: the validation scenes (synthetic: another seed; folder:
    the configured split) with deterministic resizing and fixed-seed masks (``seed + 1``)."""
    from multimae.data.transforms import PairedTransform

    specs = list(spec.specs)
    if data.source == "synthetic":
        base = build_dataset(data, specs, seed, train=False)
    elif data.source == "folder":  # the val split, or the slice of train held out; none: no batches
        base = build_dataset(data, specs, seed, train=False)
        if base is None:
            return []
    else:  # streamed shards / caption tables: the first samples of the data (not held out)
        from itertools import islice

        if data.source == "shards":
            from multimae.data.shards import ShardDataset

            stream = ShardDataset(shard_urls(data.urls), specs, shuffle_buffer=0, rank=0, world_size=1)
        else:
            stream = build_dataset(data, specs, seed)
        base = list(islice(iter(stream), limit or data.val_samples))
    transform = PairedTransform(specs, data.image_size, train=False)
    n = len(base) if limit is None else min(limit, len(base))
    collator = MaskCollator(list(spec.inputs), spec.patch_size, mask, seed + 1, text=text_collator(data, specs))
    out = []
    # full batches only (a single short one when n < batch_size)
    for s in range(0, max(n - batch_size, 0) + 1, batch_size):
        samples = [transform(base[i]) for i in range(s, min(s + batch_size, n))]
        for smp in samples:
            smp["__step__"] = (0, s)
        out.append(collator(samples))
    return out


def data_counts(dataset: Any) -> dict[str, int]:
    """Bad samples skipped and invalid pixels (NaN/inf set to 0) so far, from the raw dataset under
    a loader's wrappers (``.base`` / ``.stream`` / ``.dataset``), summed over worker processes:
    ``{"data/skipped": n, "data/invalid_pixels": m}``; {} for sources that count neither."""
    for _ in range(8):
        policy = getattr(dataset, "policy", None)
        if policy is not None and hasattr(policy, "invalid_pixels"):
            return {"data/skipped": policy.skipped, "data/invalid_pixels": policy.invalid_pixels}
        dataset = next((getattr(dataset, a) for a in ("base", "stream", "dataset") if hasattr(dataset, a)), None)
        if dataset is None:
            break
    return {}


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
    return TextCollator(enc, text_key=text[0].key, image_keys=[s.key for s in specs if s.is_spatial])


def load_text_tokenizer(name: str) -> Any:
    """The built-in synthetic tokenizer (``"synthetic"``) or one loaded from a file."""
    from multimae.data.tokenizers import default_synthetic_tokenizer, load_tokenizer

    return default_synthetic_tokenizer() if name == "synthetic" else load_tokenizer(name)
