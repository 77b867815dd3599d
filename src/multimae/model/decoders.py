"""MultiMAE's per-task decoder: one cross-attention to the encoded tokens, an MLP, N blocks.

Behaviour follows the official implementation exactly (golden tests in tests/parity):
encoder tokens are projected to the decoder width, mask tokens fill the hidden positions of
every input modality, each position gets the decoder's own sine-cosine position plus a learned
embedding of the modality it belongs to; the task's own positions (or, when the task is not an
input, mask tokens + position + task embedding) are the queries; the visible positions plus the
projected global tokens are the context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multimae.model.layers.attention import Block, CrossAttention
from multimae.model.layers.mlp import Mlp
from multimae.model.layers.pos_embed import resample_pos, sincos_1d, sincos_2d
from multimae.core.modalities import ModalitySpec


@dataclass(frozen=True)
class Segment:
    """Where one input modality's tokens sit in the concatenated token sequence."""

    name: str
    start: int
    length: int
    grid: tuple[int, int] | None  # (rows, cols) for spatial modalities, None for sequences

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class EncodedTokens:
    """What the decoders read from the encoder.

    tokens: (B, Nv + G, D) encoded visible tokens (padded to the longest sample) then G global.
    ids_keep: (B, Nv) positions (in the full sequence) of the visible tokens.
    visible_pad: (B, Nv) bool, True where a slot is padding (sample had fewer visible), or None.
    masked: (B, N) bool over the full sequence, True = not encoded.
    layout: the modality segments of the full sequence (N tokens).
    num_global: G.
    pad: (B, N) bool, True where a position does not exist (text padding, always also ``masked``),
        or None when the batch has no padding. Decoders keep these positions out of attention.
    """

    tokens: Tensor
    ids_keep: Tensor
    visible_pad: Tensor | None
    masked: Tensor
    layout: list[Segment]
    num_global: int
    pad: Tensor | None = None


class SpatialDecoder(nn.Module):
    """Decoder of one spatial task. forward(enc, grid) -> (B, C_out, rows*P, cols*P)."""

    def __init__(self, spec: ModalitySpec, context_names: list[str], enc_dim: int, dim: int = 256, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0, patch_size: int = 16, image_size: int = 224,
                 use_task_queries: bool = True, drop_path: float = 0.0, attention: str = "auto") -> None:
        super().__init__()
        self.spec = spec
        self.patch = spec.patch(patch_size)
        self.use_task_queries = use_task_queries
        g = image_size // patch_size
        self.proj_context = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.task_embeddings = nn.ParameterDict({n: nn.Parameter(torch.zeros(1, 1, dim)) for n in context_names})
        self.register_buffer("pos_emb", sincos_2d(g, g, dim))
        self.decoder = CrossAttention(dim, num_heads, mode=attention)
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.context_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        dpr = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.decoder_transformer = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, drop_path=d, attention=attention)
                                                   for d in dpr])
        self.out_proj = nn.Linear(dim, self._out_features())

    def _out_features(self) -> int:
        """Values predicted per query token: the pixels of one patch."""
        return self.spec.out_channels * self.patch * self.patch

    def _embedding(self, name: str, length: int, grid: tuple[int, int] | None, dtype: torch.dtype) -> Tensor:
        """Position + modality embedding of one segment: (1, length, dim)."""
        pos = positions(self.pos_emb, length, grid)
        if name in self.task_embeddings:
            pos = pos + self.task_embeddings[name]
        return pos.to(dtype)

    def _sequence(self, enc: EncodedTokens, own: Segment | None) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The queries of segment ``own`` (B, L, dim): its visible tokens projected, mask tokens at
        its hidden positions, plus position and modality embeddings (None if ``own`` is None); the
        context (B, Nv + G, dim): the visible tokens with their embeddings and the projected global
        tokens; and the context's key padding (B, Nv + G) or None.

        The same values as scattering every token into the full (B, N, dim) sequence and reading
        both parts from it, as the official decoders do, without building that sequence.
        """
        B = enc.tokens.shape[0]
        G = enc.num_global
        ctx = self.proj_context(enc.tokens)
        vis, glob = ctx[:, : ctx.shape[1] - G], ctx[:, ctx.shape[1] - G:]
        D, dtype = ctx.shape[-1], ctx.dtype
        mask_token = self.mask_token.to(dtype)
        if enc.visible_pad is not None:  # padded slots point at hidden positions: mask tokens there
            vis = torch.where(enc.visible_pad[..., None], mask_token, vis)
        emb = torch.cat([self._embedding(s.name, s.length, s.grid, dtype) for s in enc.layout], dim=1)
        pos = enc.ids_keep[..., None].expand(-1, -1, D)
        context = torch.cat([vis + emb.expand(B, -1, -1).gather(1, pos), glob], dim=1)
        key_pad = None
        if enc.visible_pad is not None:
            key_pad = torch.cat([enc.visible_pad, enc.visible_pad.new_zeros(B, G)], dim=1)
        queries = None
        if own is not None:
            L = own.length
            inside = (enc.ids_keep >= own.start) & (enc.ids_keep < own.end)
            if enc.visible_pad is not None:
                inside &= ~enc.visible_pad
            slot = torch.where(inside, enc.ids_keep - own.start, L)  # other tokens land in a spare slot
            q = mask_token.expand(B, L + 1, D).scatter(1, slot[..., None].expand(-1, -1, D), vis)
            queries = q[:, :L] + emb[:, own.start:own.end]
        return queries, context, key_pad

    def _decode(self, queries: Tensor, context: Tensor, key_pad: Tensor | None,
                query_pad: Tensor | None = None) -> Tensor:
        """Cross-attention to the context, MLP, self-attention blocks (``query_pad`` (B, Nq): query
        positions the blocks ignore as keys), output projection: (B, Nq, out_features)."""
        x = self.decoder(self.query_norm(queries), self.context_norm(context), key_pad)
        x = x + self.mlp(self.out_norm(x))
        for blk in self.decoder_transformer:
            x = blk(x, query_pad)
        return self.out_proj(x)

    def forward(self, enc: EncodedTokens, grid: tuple[int, int]) -> Tensor:
        B = enc.tokens.shape[0]
        # a task reads its queries from the input modality it reconstructs (norm_rgb: rgb)
        own = next((s for s in enc.layout if s.name == self.spec.key), None)
        queries, context, key_pad = self._sequence(enc, own if self.use_task_queries else None)
        if queries is None:
            queries = self.mask_token.to(context.dtype) + self._embedding(self.spec.key, grid[0] * grid[1], grid,
                                                                          context.dtype)
            queries = queries.expand(B, -1, -1)
        return to_image(self._decode(queries, context, key_pad), grid, self.spec.out_channels, self.patch)


def positions(table: Tensor, length: int, grid: tuple[int, int] | None) -> Tensor:
    """(1, length, dim) positions of one segment: the 2D table ``table`` (1, dim, h, w) at ``grid``
    (resampled bilinearly when it differs), or 1D sine-cosine ones for a sequence (``grid`` None)."""
    if grid is not None:
        return resample_pos(table, grid, "bilinear")
    return sincos_1d(length, table.shape[1]).to(table.device)


def to_image(y: Tensor, grid: tuple[int, int], channels: int, patch: int) -> Tensor:
    """Decoder output (B, rows*cols, C*P*P), each token channel-major -> (B, C, rows*P, cols*P)."""
    B, (rows, cols) = y.shape[0], grid
    y = y.reshape(B, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(B, channels, rows * patch, cols * patch)
