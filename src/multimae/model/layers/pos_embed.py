"""Fixed sine-cosine position embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """2D sine-cosine table laid out as an image: (1, dim, h, w).

    A quarter of the channels each for sin/cos of the column index and sin/cos of the row
    index (the layout of the official MultiMAE tables, so official checkpoints agree with it).
    """
    if dim % 4:
        raise ValueError(f"2D sine-cosine embedding needs dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float32) / q)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    # the first half encodes the row index (first table axis), as in the official tables
    a = torch.outer(rows.flatten(), omega)
    b = torch.outer(cols.flatten(), omega)
    emb = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)  # (h*w, dim)
    return emb.T.reshape(1, dim, h, w).contiguous()


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """1D sine-cosine table: (1, length, dim) (sin in the first half, cos in the second)."""
    if dim % 2:
        raise ValueError(f"1D sine-cosine embedding needs an even dim, got {dim}")
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32) / half)
    a = torch.outer(torch.arange(length, dtype=torch.float32), omega)
    return torch.cat([a.sin(), a.cos()], dim=1)[None]


def resample_pos(pos: Tensor, grid: tuple[int, int], mode: str) -> Tensor:
    """(1, D, h, w) table -> (1, gh*gw, D) tokens, resampled to ``grid`` when it differs."""
    if tuple(pos.shape[-2:]) != tuple(grid):
        pos = F.interpolate(pos, size=grid, mode=mode, align_corners=False)
    return pos.flatten(2).transpose(1, 2)
