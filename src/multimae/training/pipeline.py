"""DEPRECATED re-export: the loader lives in :mod:`multimae.data.loader`. Removed soon."""
from __future__ import annotations

from typing import Any

from multimae.data.loader import (  # noqa: F401
    BatchSpec, CachedDataset, MaskCollator, ResumableBatchSampler, SeededAugment, Unpairing, build_dataset, mix_seed,
    load_text_tokenizer, shard_urls, text_collator,
)
from multimae.data.loader import eval_batches as _eval_batches


def eval_batches(model: Any, cfg: Any, batch_size: int = 16, limit: int | None = None) -> list:
    """Old signature of :func:`multimae.data.loader.eval_batches`."""
    return _eval_batches(BatchSpec.of(model), cfg.data, cfg.mask, cfg.train.seed, batch_size, limit)
