"""Named encoder/decoder sizes. A run config picks one with ``model.preset`` and may override
any field (``model.depth=6``)."""
from __future__ import annotations

# name: (dim, depth, heads, decoder dim, decoder depth, decoder heads)
PRESETS: dict[str, dict[str, int]] = {
    # CPU smoke runs and the quick start: trains in minutes on 2 cores.
    "nano": dict(dim=128, depth=4, num_heads=4, decoder_dim=128, decoder_depth=1, decoder_heads=4),
    "tiny": dict(dim=192, depth=12, num_heads=3, decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "small": dict(dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=2, decoder_heads=8),
    # the paper's MultiMAE-B: ViT-B/16 encoder, 256-d x 2 decoders with 8 heads
    "base": dict(dim=768, depth=12, num_heads=12, decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "large": dict(dim=1024, depth=24, num_heads=16, decoder_dim=256, decoder_depth=2, decoder_heads=8),
}


def preset(name: str) -> dict[str, int]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
