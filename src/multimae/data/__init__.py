"""The data layer: synthetic scenes, folder and shard datasets, paired transforms, collation.

Every dataset yields *raw samples*, dicts with (a configured subset of):

* ``rgb`` uint8 (3,H,W); ``depth`` float32 (1,H,W), 0 = invalid; ``semseg`` int64 (H,W);
  ``normals`` float32 (3,H,W) camera-frame unit vectors; ``label`` int64 (); ``caption`` str;
* a multi-band raster (a ``dense`` spec with ``bands`` / ``nodata``): float32 (C,H,W) raw band
  values, NaN at nodata (:mod:`multimae.data.rasters`);
* ``__key__`` str, the sample id.

:class:`~multimae.data.transforms.PairedTransform` turns a raw sample into a model-ready one and
:func:`collate` stacks those into a batch.
"""
from __future__ import annotations

import torch

from multimae.data.errors import DataError


def collate(samples: list[dict]) -> dict:
    """Stack a list of samples into a batch.

    Tensors are stacked (a 0-dim ``label`` becomes (B,)), str fields (``caption``, ``__key__``)
    become lists of str, Python numbers become tensors; every sample must have the same keys.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = list(samples[0])
    for s in samples[1:]:
        if set(s) != set(keys):
            raise DataError(f"cannot collate sample {s.get('__key__', '?')}: keys {sorted(s)} differ "
                            f"from {sorted(keys)} of sample {samples[0].get('__key__', '?')}")
    batch: dict = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if torch.is_tensor(vals[0]):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise DataError(f"cannot collate {k!r}: shapes differ {sorted(shapes)}")
            batch[k] = torch.stack(vals)
        elif isinstance(vals[0], (bool, int, float)):
            batch[k] = torch.tensor(vals)
        else:
            batch[k] = list(vals)
    return batch


def stack_present(samples: list[dict], key: str, empty: "torch.Tensor | None" = None
                  ) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """``key`` of samples of which some may lack it: the stacked tensor (B, ...), zeros where a
    sample lacks it, and the presence vector bool (B,). ``empty``: the zeros of one sample, for a
    batch where no sample has the key (None: then None is returned). DataError naming the sample
    when shapes differ (transform the samples first)."""
    values = [s.get(key) for s in samples]
    ref = next((v for v in values if v is not None), None)
    if ref is None:
        if empty is None:
            return None
        ref = empty
    for s, v in zip(samples, values):
        if v is not None and (not torch.is_tensor(v) or v.shape != ref.shape):
            got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise DataError(f"cannot collate {key!r} of sample {s.get('__key__', '?')}: {got}, "
                            f"expected a tensor of shape {tuple(ref.shape)} (transform the samples first)")
    zeros = torch.zeros_like(ref)
    return (torch.stack([v if v is not None else zeros for v in values]),
            torch.tensor([v is not None for v in values], dtype=torch.bool))


__all__ = ["DataError", "collate", "stack_present"]
