"""Text adapters (M3AE, Geng et al. 2022): token embedding in, token logits out.

* :class:`TextInput`: ids (B, L) -> tokens (B, L, D) = token embedding + fixed 1D sine-cosine
  position + a learned modality-type embedding.
* :class:`TextDecoder`: MultiMAE's per-task arrangement for a text task: the
  :class:`~multimae.model.decoders.SpatialDecoder` structure (cross-attention of the task's
  queries to the visible context, MLP, blocks) with the text positions as queries and token logits
  (B, L, V) as output.
* :class:`SharedDecoder`: M3AE's arrangement: ONE transformer over the full sequence of every
  modality (visible tokens + per-modality mask tokens, positions and type embeddings) and the
  global tokens, then a linear head per reconstructed modality.

Padding: text positions that are padding (``EncodedTokens.pad``) are never encoded, never part
of a decoder's context, and are excluded as attention keys, so real outputs do not depend on the
padded length.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from multimae.model.decoders import EncodedTokens, Segment, SpatialDecoder, positions, to_image
from multimae.model.layers.attention import Block
from multimae.model.layers.pos_embed import sincos_1d, sincos_2d
from multimae.core.modalities import ModalitySpec


class TextInput(nn.Module):
    """Token ids (B, L) int64 in [0, vocab) -> tokens (B, L, dim).

    ``token_emb`` (vocab, dim) + 1D sine-cosine positions (a buffer for ``spec.max_len``, computed
    on the fly for longer inputs) + ``type_emb`` (1, 1, dim), the M3AE modality-type embedding.
    """

    def __init__(self, spec: ModalitySpec, dim: int) -> None:
        super().__init__()
        if spec.kind != "text":
            raise ValueError(f"{spec.name}: TextInput needs a text modality, got kind {spec.kind!r}")
        self.spec = spec
        self.token_emb = nn.Embedding(spec.num_classes, dim)
        self.register_buffer("pos_emb", sincos_1d(spec.max_len, dim), persistent=False)
        self.type_emb = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.type_emb, std=0.02)

    def _check(self, ids: Tensor) -> None:
        s = self.spec
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{s.name}: expected integer token ids (B, L), got {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"{s.name}: expected token ids (B, L), got shape {tuple(ids.shape)}")
        check_ids(self, ids, "token", " (the vocabulary size is the spec's num_classes)")

    def positions(self, length: int) -> Tensor:
        """Position embeddings (1, length, dim)."""
        if length <= self.pos_emb.shape[1]:
            return self.pos_emb[:, :length]
        return sincos_1d(length, self.pos_emb.shape[-1]).to(self.pos_emb.device)

    def forward(self, ids: Tensor) -> Tensor:
        self._check(ids)
        x = self.token_emb(ids.long())
        return x + (self.positions(ids.shape[1]) + self.type_emb).to(x.dtype)


def check_ids(adapter: nn.Module, ids: Tensor, what: str, hint: str = "") -> None:
    """Ids outside ``[0, adapter.spec.num_classes)`` are an error naming one; checked in eval mode
    only (in training the data path checks) and not while compiling."""
    s = adapter.spec
    if not adapter.training and not torch.compiler.is_compiling() and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= s.num_classes:
            raise ValueError(f"{s.name}: {what} id {hi if hi >= s.num_classes else lo} out of range "
                             f"[0, {s.num_classes}){hint}")


def _text_segment(spec: ModalitySpec, layout: Sequence[Segment]) -> Segment:
    seg = next((s for s in layout if s.name == spec.key), None)
    if seg is None:
        raise ValueError(
            f"{spec.name}: text targets need the text positions, so {spec.key!r} must be an input of the "
            f"forward pass (it may be fully masked); encoded inputs: {[s.name for s in layout]}")
    return seg


def _query_pad(pad: Tensor | None, seg: Segment) -> Tensor | None:
    """Padding of one segment's positions (B, L); a sample with no real token keeps its (unused)
    positions as keys so that attention never sees an all-masked row."""
    if pad is None:
        return None
    p = pad[:, seg.start:seg.end].bool()
    return p & ~p.all(1, keepdim=True)


class TextDecoder(SpatialDecoder):
    """MultiMAE-style decoder of a text task. forward(enc, grid) -> logits (B, L, vocab).

    Same modules (and parameter names) as :class:`SpatialDecoder`: the queries are the text
    positions of the full sequence (visible tokens projected, mask tokens at hidden positions,
    1D sine-cosine position + learned task embedding), they cross-attend to the visible context
    and then to each other in the blocks, padding excluded. ``grid`` is ignored; the length comes
    from the text's segment in ``enc.layout``, so the text must be an encoder input (possibly fully
    masked). ``patch_size`` / ``image_size`` set the 2D positions of image context tokens.
    """

    def __init__(self, spec: ModalitySpec, context_names: list[str], enc_dim: int, dim: int = 256, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0, patch_size: int = 16, image_size: int = 224,
                 use_task_queries: bool = True, drop_path: float = 0.0, attention: str = "auto") -> None:
        if spec.kind != "text":
            raise ValueError(f"{spec.name}: TextDecoder needs a text modality, got kind {spec.kind!r}")
        super().__init__(spec, context_names, enc_dim, dim, depth, num_heads, mlp_ratio, patch_size, image_size,
                         use_task_queries, drop_path, attention)

    def _out_features(self) -> int:
        return self.spec.num_classes

    def forward(self, enc: EncodedTokens, grid: tuple[int, int] | None = None) -> Tensor:
        own = _text_segment(self.spec, enc.layout)
        queries, context, key_pad = self._sequence(enc, own if self.use_task_queries else None)
        if queries is None:
            emb = self._embedding(self.spec.key, own.length, None, context.dtype)
            queries = (self.mask_token.to(context.dtype) + emb).expand(context.shape[0], -1, -1)
        return self._decode(queries, context, key_pad, _query_pad(enc.pad, own))


class SharedDecoder(nn.Module):
    """M3AE's decoder: one transformer over all modalities, then a linear head per modality.

    Args:
        specs: the modalities to reconstruct (e.g. rgb and caption); each reads the segment of its
            batch key (``spec.key``) in the encoded layout.
        enc_dim: encoder width; ``dim``/``depth``/``num_heads``: the decoder transformer.
        patch_size, image_size: the image patch and the size the 2D position table is built for
            (resampled for other grids).
        context_names: further encoder inputs that are not reconstructed but take part in the
            decoder (they get a mask token and type embedding too).

    forward(enc, grid) -> {name: prediction}: image/dense (B, C, rows*P, cols*P), categorical
    (B, K, rows*P, cols*P) logits, text (B, L, V) logits. The sequence is every input segment in
    ``enc.layout`` (visible tokens projected to ``dim``; hidden positions get their modality's
    mask token), plus, for a spatial target that was not an input, mask-token queries on ``grid``;
    each position gets a 2D (image) or 1D (text) sine-cosine position and its modality's type
    embedding; the projected global tokens join. Padding (``enc.pad``) is excluded as keys.
    """

    def __init__(self, specs: Sequence[ModalitySpec], enc_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, patch_size: int = 16, image_size: int = 256, mlp_ratio: float = 4.0,
                 context_names: Sequence[str] = (), drop_path: float = 0.0, attention: str = "auto") -> None:
        super().__init__()
        if not specs:
            raise ValueError("SharedDecoder: no modality to reconstruct")
        self.specs = {s.name: s for s in specs}
        self.patch_size = patch_size
        names = list(dict.fromkeys([s.key for s in specs] + list(context_names)))
        self.proj_context = nn.Linear(enc_dim, dim)
        self.mask_tokens = nn.ParameterDict({n: nn.Parameter(torch.zeros(1, 1, dim)) for n in names})
        self.type_emb = nn.ParameterDict({n: nn.Parameter(torch.zeros(1, 1, dim)) for n in names})
        g = image_size // patch_size
        self.register_buffer("pos_emb", sincos_2d(g, g, dim))
        dpr = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, drop_path=d, attention=attention) for d in dpr])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.ModuleDict({s.name: nn.Linear(dim, self._out_features(s)) for s in specs})
        for p in [*self.mask_tokens.values(), *self.type_emb.values()]:
            nn.init.trunc_normal_(p, std=0.02)

    def _out_features(self, spec: ModalitySpec) -> int:
        if spec.kind == "text":
            return spec.num_classes
        p = spec.patch(self.patch_size)
        return spec.out_channels * p * p

    def _embedding(self, name: str, length: int, grid: tuple[int, int] | None) -> Tensor:
        """Position + type embedding of one segment: (1, length, dim)."""
        return positions(self.pos_emb, length, grid) + self.type_emb[name]

    def _sequence(self, enc: EncodedTokens, grid: tuple[int, int]) -> tuple[Tensor, list[Segment]]:
        """Decoder input (B, N + extra, dim) without global tokens, and its segments."""
        unknown = [s.name for s in enc.layout if s.name not in self.mask_tokens]
        if unknown:
            raise ValueError(f"SharedDecoder: encoded inputs {unknown} have no mask token here; "
                             f"pass them as context_names (known: {list(self.mask_tokens)})")
        B, G = enc.tokens.shape[0], enc.num_global
        ctx = self.proj_context(enc.tokens)
        vis, D, N = ctx[:, : ctx.shape[1] - G], ctx.shape[-1], enc.masked.shape[1]
        full = ctx.new_zeros(B, N, D).scatter(1, enc.ids_keep[..., None].expand(-1, -1, D), vis)
        masks = torch.cat([self.mask_tokens[s.name].expand(1, s.length, D) for s in enc.layout], dim=1)
        full = torch.where(enc.masked[..., None], masks.to(ctx.dtype), full)
        emb = torch.cat([self._embedding(s.name, s.length, s.grid) for s in enc.layout], dim=1)
        parts, layout, start = [full + emb.to(ctx.dtype)], list(enc.layout), N
        for key in dict.fromkeys(s.key for s in self.specs.values()):
            if any(s.name == key for s in layout):
                continue
            spec = next(s for s in self.specs.values() if s.key == key)
            if spec.kind == "text":
                _text_segment(spec, enc.layout)  # raises: text positions are unknown
            n = grid[0] * grid[1]
            q = self.mask_tokens[key] + self._embedding(key, n, grid)
            parts.append(q.to(ctx.dtype).expand(B, -1, -1))
            layout.append(Segment(key, start, n, grid))
            start += n
        return torch.cat(parts + [ctx[:, ctx.shape[1] - G:]], dim=1), layout

    def forward(self, enc: EncodedTokens, grid: tuple[int, int]) -> dict[str, Tensor]:
        x, layout = self._sequence(enc, grid)
        B, T = x.shape[:2]
        key_pad = None
        if enc.pad is not None:
            key_pad = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            key_pad[:, : enc.pad.shape[1]] = enc.pad.bool()
        for blk in self.blocks:
            x = blk(x, key_pad)
        x = self.norm(x)
        out = {}
        for name, spec in self.specs.items():
            seg = next(s for s in layout if s.name == spec.key)
            y = self.heads[name](x[:, seg.start:seg.end])
            out[name] = y if spec.kind == "text" else to_image(y, seg.grid or grid, spec.out_channels,
                                                               spec.patch(self.patch_size))
        return out
