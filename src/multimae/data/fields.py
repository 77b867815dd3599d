"""Which fields a dataset reads, from a list of modalities (configuration, not code)."""
from __future__ import annotations

from typing import Sequence

import torch

from multimae.data.codecs import LABEL_KEY, validate_field
from multimae.data.errors import DataError
from multimae.modalities import ModalitySpec, registered, resolve


def by_key(specs: Sequence[ModalitySpec]) -> dict[str, ModalitySpec]:
    """One spec per batch key (``spec.key``).

    A spec that can be an input wins over an output-only one (``norm_rgb`` reads ``rgb``); an
    output-only spec alone is replaced by the registered spec of its source key when there is one.
    """
    out: dict[str, ModalitySpec] = {}
    reg = registered()
    for spec in specs:
        if not spec.input and spec.key != spec.name and spec.key in reg:
            spec = reg[spec.key] if spec.key not in out else out[spec.key]
        if spec.key not in out or (spec.input and not out[spec.key].input):
            out[spec.key] = spec
    return out


def resolve_fields(modalities: Sequence[str | dict | ModalitySpec]) -> tuple[dict[str, ModalitySpec], bool]:
    """Specs by batch key, and whether the image-level ``label`` was asked for."""
    items = [m for m in modalities if m != LABEL_KEY]
    if not items and LABEL_KEY not in modalities:
        raise ValueError("no modalities given")
    return by_key(resolve(items)), LABEL_KEY in modalities


def validate_sample(sample: dict, specs: dict[str, ModalitySpec], where: dict[str, str], sample_where: str) -> None:
    """Check every configured field and that spatial fields share one size.

    ``where`` maps a field key to the text naming it in errors (a file path, or sample + shard).
    """
    for key, spec in specs.items():
        validate_field(sample[key], spec, where.get(key, sample_where))
    sizes = {k: tuple(sample[k].shape[-2:]) for k, s in specs.items() if s.is_spatial and torch.is_tensor(sample[k])}
    if len(set(sizes.values())) > 1:
        desc = "; ".join(f"{k} {h}x{w} ({where.get(k, k)})" for k, (h, w) in sizes.items())
        raise DataError(f"{sample_where}: modalities have different sizes: {desc}")
