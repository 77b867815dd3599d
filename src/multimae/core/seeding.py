"""The one way this library derives seeds: :func:`derive_seed` (and :func:`generator`).

Every random stream of the data path (sampler permutations, shard order, shuffle buffers, crops
and flips, mask plans) is ``torch.Generator().manual_seed(derive_seed(run_seed, "<what>", ...))``
with the integers that identify it (epoch, rank, worker, batch index, sample index ...), so each
is a pure function of those numbers and never of process or worker scheduling.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable values (ints, strings); identical across processes,
    machines and runs. Distinct part tuples give independent-looking seeds (BLAKE2b)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
