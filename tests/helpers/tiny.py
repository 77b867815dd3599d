"""The one tiny model the tests share (issue 27): a preset "nano" MultiMAE shrunk to dim 32,
depth 2, 2 heads, 8-px patches on 32-px images, small enough that building it takes milliseconds.

- :data:`TINY`: its :class:`ModelConfig` fields; ``{**TINY, "depth": 1}`` or
  :func:`tiny_config` ``(depth=1)`` for a variant.
- :func:`tiny_config` / :func:`tiny_model`: the config / the model, with field overrides.
- :data:`TINY_OVERRIDES`: the command-line overrides (``model.*`` plus the matching
  ``data.image_size``) that shrink a pretraining run config; tests append their own data / train keys.
- :func:`tiny_encoder_override` / :func:`tiny_yaml`: the ``model.encoder={...}`` override of a
  fine-tuning run config / its value.

Tests whose assertions depend on exact sizes (parity and golden files, shape checks, memory
bounds) keep their own numbers.
"""
from __future__ import annotations

from typing import Any

from multimae.model.config import ModelConfig

TINY: dict[str, Any] = dict(preset="nano", dim=32, depth=2, num_heads=2, patch_size=8, image_size=32)

# the nano preset (dim 128, 4 heads) cut to one block, on 32-px images with 8-px patches
TINY_OVERRIDES: list[str] = ["model.preset=nano", "model.depth=1", "model.image_size=32", "model.patch_size=8",
                             "data.image_size=32"]


def tiny_config(**overrides: Any) -> ModelConfig:
    """:data:`TINY` with ``overrides`` (any :class:`ModelConfig` field) as a config."""
    return ModelConfig(**{**TINY, **overrides})


def tiny_model(**overrides: Any):
    """A :class:`~multimae.model.multimae.MultiMAE` built from :func:`tiny_config` ``(**overrides)``
    (training mode, weights from the current torch RNG state)."""
    from multimae.model.multimae import MultiMAE

    return MultiMAE(tiny_config(**overrides))


def _yaml(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def tiny_yaml(**overrides: Any) -> str:
    """:data:`TINY` with ``overrides`` as a YAML flow mapping, the value of a ``model.encoder=`` override."""
    return _yaml({**TINY, **overrides})


def tiny_encoder_override(**overrides: Any) -> str:
    """``model.encoder={...}`` for a fine-tuning config: :data:`TINY` with ``overrides``, e.g.
    ``tiny_encoder_override(depth=1)`` -> ``model.encoder={preset: nano, dim: 32, depth: 1, ...}``."""
    return "model.encoder=" + tiny_yaml(**overrides)
