"""Self- and cross-attention and the pre-norm transformer block.

Parameter names (``qkv``, ``q``/``kv``, ``proj``, ``norm1``, ``mlp.fc1`` ...) follow the timm /
official MultiMAE layout so that external checkpoints load without renaming.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` or the explicit
``softmax(q k^T) v`` form (batched matmuls). Every attention layer has its own ``mode``, set from
the model's config at construction (``ModelConfig.attention``, passed down to every layer;
:func:`set_attention` changes a built model, for export):
``"fused"``, ``"manual"`` or ``"auto"`` (default): explicit for bf16/fp16 tensors on the CPU, where
torch's CPU flash kernel is slower than two AMX/AVX512 batched matmuls (ViT-B bf16 step 1.39 s
fused vs 1.06 s explicit, ``benchmarks/pretrain_throughput.py``), fused everywhere else. Both give
the same result up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae.model.layers.mlp import Mlp

ATTENTION_MODES = ("auto", "fused", "manual")


def check_attention_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ATTENTION_MODES`, else a ValueError naming it."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {ATTENTION_MODES}")
    return mode


def set_attention(module: nn.Module, mode: str) -> nn.Module:
    """Choose the kernel of every attention layer inside ``module`` (in place); returns it."""
    check_attention_mode(mode)
    for m in module.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.mode = mode
    return module


def use_fused(q: Tensor, mode: str) -> bool:
    """Whether ``mode`` runs the fused kernel for queries ``q`` (auto: not for CPU bf16/fp16)."""
    if mode == "auto":
        return not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16))
    return mode == "fused"


def attend(q: Tensor, k: Tensor, v: Tensor, key_pad: Tensor | None, mode: str = "auto") -> Tensor:
    """q: (B, h, Nq, d), k/v: (B, h, Nk, d), key_pad: (B, Nk) bool, True = ignore -> (B, h, Nq, d)."""
    mask = None if key_pad is None else ~key_pad[:, None, None, :]  # True = take part in attention
    if use_fused(q, mode):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    return attn.softmax(dim=-1) @ v  # for bf16 the CPU kernel accumulates in fp32


class _MultiHead(nn.Module):
    """What self- and cross-attention share: ``num_heads`` heads over ``dim`` and the kernel ``mode``."""

    def __init__(self, dim: int, num_heads: int, mode: str) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.mode = check_attention_mode(mode)


class Attention(_MultiHead):
    """Multi-head self-attention. x: (B, N, D) -> (B, N, D). ``mode``: the kernel (see module doc)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, mode: str = "auto") -> None:
        super().__init__(dim, num_heads, mode)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_pad: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, key_pad, self.mode)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(_MultiHead):
    """Queries attend to a context. x: (B, Nq, D), context: (B, Nk, D) -> (B, Nq, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, mode: str = "auto") -> None:
        super().__init__(dim, num_heads, mode)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, key_pad: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        M = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(context).reshape(B, M, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, key_pad, self.mode)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, attention: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, mode=attention)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: Tensor, key_pad: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_pad))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_layer(rate: float) -> nn.Module:
    """timm's stochastic depth for ``rate`` > 0, else an identity. timm is imported only then: it
    pulls in torchvision (~250 MB resident per process), which a pretraining run (no drop path)
    never needs -- on every FSDP / DDP rank."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)
