"""Layer ids of ViT parameters for layer-wise learning-rate decay, from their names.

Below the model and the optimizer: :mod:`multimae.engine.optim` (param groups) and
:mod:`multimae.model.transfer.model` (the transfer model's ``layer_id``) both read it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["EMBED_PATTERNS", "vit_layer_id"]

#: Parameter-name substrings that belong to the embedding "layer 0" in :func:`vit_layer_id`.
EMBED_PATTERNS: tuple[str, ...] = (
    "input_adapters",
    "patch_embed",
    "pos_emb",
    "pos_embed",
    "global_tokens",
    "cls_token",
    "mask_token",
)
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|encoder)\.(\d+)\.")  # timm's blocks.<i>, MultiMAE's encoder.<i>


def vit_layer_id(name: str, num_layers: int, embed_patterns: Iterable[str] = EMBED_PATTERNS) -> int:
    """Layer index of a ViT parameter for layer-wise lr decay.

    Embeddings (names containing one of ``embed_patterns``) -> 0; ``...blocks.<i>.`` or
    ``...encoder.<i>.`` -> ``i + 1``;
    anything else (final norm, heads) -> ``num_layers + 1``.
    """
    if any(p in name for p in embed_patterns):
        return 0
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1
