"""Which fields a dataset reads, from a list of modalities (configuration, not code)."""
from __future__ import annotations

from typing import Sequence

import torch

from multimae.data.codecs import LABEL_KEY, Packed, validate_field
from multimae.data.errors import DataError
from multimae.core.modalities import ModalitySpec, registered, resolve


def by_key(specs: Sequence[ModalitySpec]) -> dict[str, ModalitySpec]:
    """One spec per batch key (``spec.key``).

    A spec that can be an input wins over an output-only one (``norm_rgb`` reads ``rgb``); an
    output-only spec whose key no given spec reads is replaced by the registered spec of that key
    when there is one. Given specs are used as they are (a run's own modalities and class
    counts), never looked up again by name.
    """
    out: dict[str, ModalitySpec] = {}
    for spec in specs:
        if spec.input and spec.key not in out:
            out[spec.key] = spec
    reg = registered()
    for spec in specs:
        if spec.key not in out:
            out[spec.key] = reg[spec.key] if spec.key != spec.name and spec.key in reg else spec
    return out


def resolve_fields(modalities: Sequence[str | dict | ModalitySpec]) -> tuple[dict[str, ModalitySpec], bool]:
    """Specs by batch key, and whether the image-level ``label`` was asked for."""
    items = [m for m in modalities if m != LABEL_KEY]
    if not items and LABEL_KEY not in modalities:
        raise ValueError("no modalities given")
    return by_key(resolve(items)), LABEL_KEY in modalities


def validate_sample(sample: dict, specs: dict[str, ModalitySpec], where: dict[str, str], sample_where: str) -> int:
    """Check every configured field and that spatial fields share one size; returns the number of
    invalid pixels repaired.

    Non-finite values (NaN/inf, e.g. a float disparity map) of a dense field are invalid pixels:
    they are set to 0 in place -- for depth-like maps (``standardize="robust"``) 0 already means
    invalid, so they are left out of the statistics -- and counted. A dense map without any valid
    pixel is a DataError. ``where`` maps a field key to the text naming it in errors (a file path,
    or sample + shard). :class:`~multimae.data.codecs.Packed` fields are checked on their integers.
    A raster's (``spec.is_raster``) NaN pixels are its nodata: kept as NaN for the transforms.
    """
    repaired = 0
    for key, spec in specs.items():
        validate_field(sample[key], spec, where.get(key, sample_where))
        value = sample[key]
        if spec.kind == "dense" and not spec.is_raster and torch.is_tensor(value) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            n = int(bad.sum())
            if n:
                sample[key] = value.masked_fill(bad, 0.0)
                repaired += n
    sizes = {k: tuple(sample[k].shape[-2:]) for k, s in specs.items()
             if s.is_spatial and (torch.is_tensor(sample[k]) or isinstance(sample[k], Packed))}
    if len(set(sizes.values())) > 1:
        desc = "; ".join(f"{k} {h}x{w} ({where.get(k, k)})" for k, (h, w) in sizes.items())
        raise DataError(f"{sample_where}: modalities have different sizes: {desc}")
    return repaired
