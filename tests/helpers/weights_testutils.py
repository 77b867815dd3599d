"""Tiny external checkpoints built in the tests from their key names (facebookresearch/mae, timm)."""
from __future__ import annotations

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer


def mae_sincos(dim: int, gh: int, gw: int) -> torch.Tensor:
    """MAE's fixed table as facebookresearch/mae lays it out: (gh*gw, dim), the column index in the
    first half of the channels, the row index in the second, [sin, cos] in each half."""
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij")

    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)).float()


def _block(sd: dict, prefix: str, dim: int, r) -> None:
    for n in ("norm1", "norm2"):
        sd[f"{prefix}.{n}.weight"] = 1 + r(dim)
        sd[f"{prefix}.{n}.bias"] = r(dim)
    for n, (o, i) in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (4 * dim, dim),
                      "mlp.fc2": (dim, 4 * dim)}.items():
        sd[f"{prefix}.{n}.weight"] = r(o, i) * 5
        sd[f"{prefix}.{n}.bias"] = r(o)


def mae_state_dict(dim: int = 32, depth: int = 2, patch: int = 8, grid: int = 4, full: bool = False,
                   dec_dim: int = 16, dec_depth: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A MAE pretraining state dict (``mae_pretrain_vit_*.pth`` layout; ``full``: with the decoder)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    n = grid * grid
    sd = {"cls_token": r(1, 1, dim) * 10,
          "pos_embed": torch.cat([torch.zeros(1, dim), mae_sincos(dim, grid, grid)])[None],
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        _block(sd, f"blocks.{i}", dim, r)
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dim), r(dim)
    if full:
        sd["mask_token"] = r(1, 1, dec_dim)
        sd["decoder_embed.weight"], sd["decoder_embed.bias"] = r(dec_dim, dim), r(dec_dim)
        sd["decoder_pos_embed"] = torch.cat([torch.zeros(1, dec_dim), mae_sincos(dec_dim, grid, grid)])[None]
        for i in range(dec_depth):
            _block(sd, f"decoder_blocks.{i}", dec_dim, r)
        sd["decoder_norm.weight"], sd["decoder_norm.bias"] = 1 + r(dec_dim), r(dec_dim)
        sd["decoder_pred.weight"], sd["decoder_pred.bias"] = r(patch * patch * 3, dec_dim), r(patch * patch * 3)
    assert sd["pos_embed"].shape == (1, n + 1, dim)
    return sd


def timm_vit(dim: int = 32, depth: int = 2, heads: int = 2, patch: int = 8, size=32, **kw) -> VisionTransformer:
    """A small timm ViT (eval mode) with non-trivial weights; ``size`` an int or (H, W)."""
    torch.manual_seed(0)
    m = VisionTransformer(img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                          num_classes=0, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def timm_features(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's tokens reordered like MultiMAE's: (B, N + 1, D), the class token last."""
    with torch.no_grad():
        f = vit.forward_features(x)
    return torch.cat([f[:, 1:], f[:, :1]], dim=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
