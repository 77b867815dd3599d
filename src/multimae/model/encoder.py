"""The MultiMAE encoder, shared by pretraining and fine-tuning.

Per-modality input adapters -> tokens of the given modalities, concatenated -> the global
token(s) appended -> pre-norm transformer blocks -> an optional final norm.
:class:`multimae.model.multimae.MultiMAE` (masking + decoders) and
:class:`multimae.model.transfer.TransferModel` (all tokens + a head) are both this class with
more on top, so their encoder weights carry the same names -- the official MultiMAE / MultiViT
names, which external checkpoints load under without renaming::

    input_adapters.<modality>.*   global_tokens   encoder.<i>.*   encoder_norm.*

The attention kernel of every layer is a constructor argument (``ModelConfig.attention``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from multimae.core import modalities as M
from multimae.core.batch import Batch
from multimae.model.adapters.input import build_input_adapter
from multimae.model.config import ModelConfig
from multimae.model.decoders import Segment
from multimae.model.layers.attention import Block
from multimae.model.layers.init import init_

__all__ = ["Encoder", "EncoderOutput", "image_size_of"]


@dataclass
class EncoderOutput:
    """last: (B, N + G, D) final tokens (modality tokens in ``layout`` order, then G global),
    after the final norm if the encoder has one; layers: block index -> (B, N + G, D) output of
    that block (the ones asked for; never normed);
    layout: where each modality's tokens sit; image_size: (H, W) of the input."""

    last: Tensor
    layers: dict[int, Tensor]
    layout: list[Segment]
    image_size: tuple[int, int]
    #: (B, N) True where a modality token does not exist (a sample lacking that input modality,
    #: ``Batch.present``): kept out of attention and of pooling; None when every token exists.
    pad: Tensor | None = None


class Encoder(nn.Module):
    """Input adapters of ``cfg.inputs``, global tokens, ``cfg.depth`` blocks (stochastic depth
    rising linearly to ``cfg.drop_path``), final norm when ``cfg.encoder_norm``.

    ``cfg`` must be resolved (:meth:`ModelConfig.resolved`). Weights are as the layers' own
    constructors leave them; :meth:`reset_parameters` sets the official initialisation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_specs = {s.name: s for s in cfg.specs(cfg.inputs)}
        for s in self.input_specs.values():
            if not s.input:
                raise ValueError(f"modality {s.name!r} is output-only and cannot be a model input")
        self.encoder_config = cfg
        self.dim, self.depth, self.patch_size = cfg.dim, cfg.depth, cfg.patch_size
        self.input_adapters = nn.ModuleDict({
            n: build_input_adapter(s, cfg.dim, cfg.patch_size, cfg.image_size) for n, s in self.input_specs.items()})
        self.global_tokens = nn.Parameter(torch.zeros(1, cfg.num_global_tokens, cfg.dim))
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # cpu: builds under torch.device("meta") too
        self.encoder = nn.Sequential(*[Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, drop_path=d, norm_eps=cfg.norm_eps,
                                             attention=cfg.attention) for d in dpr])
        self.encoder_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.encoder_norm else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform linears (q, k, v treated as separate
        matrices), patch projections initialised like linears, 0.02 truncated normal tokens, zero
        mask tokens of the per-task decoders. Every parameter of every submodule built so far is
        set here, through :func:`multimae.model.layers.init.init_` (so a sharded model gets the
        unsharded weights)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / (m.weight.shape[0] // parts + m.weight.shape[1]))
                init_(m.weight, nn.init.uniform_, -bound, bound)
            elif isinstance(m, nn.LayerNorm):
                init_(m.weight, nn.init.ones_)
            elif isinstance(m, nn.Conv2d):
                init_(m.weight, lambda w: nn.init.xavier_uniform_(w.view(w.shape[0], -1)))
            elif isinstance(m, nn.Embedding):
                init_(m.weight, nn.init.trunc_normal_, std=0.02)
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)) and m.bias is not None:
                init_(m.bias, nn.init.zeros_)  # no draw: the order of these does not matter
        init_(self.global_tokens, nn.init.trunc_normal_, std=0.02)
        for name, p in self.named_parameters():
            if "task_embeddings" in name or "type_emb" in name or ".mask_tokens." in name:
                init_(p, nn.init.trunc_normal_, std=0.02)
            elif name.endswith(".mask_token"):
                init_(p, nn.init.zeros_)

    def tokenize(self, batch: Mapping[str, Any], names: Sequence[str]) -> tuple[Tensor, list[Segment]]:
        """Tokens of the modalities ``names`` (each through its input adapter), concatenated in
        that order: (B, N, D), and where each modality sits (its token grid, None for text)."""
        toks, layout, start = [], [], 0
        for n in names:
            spec = self.input_specs[n]
            t = self.input_adapters[n](batch[spec.key])
            toks.append(t)
            layout.append(Segment(n, start, t.shape[1], spec.grid(batch[spec.key].shape, self.patch_size)))
            start += t.shape[1]
        return torch.cat(toks, dim=1), layout

    def run_blocks(self, x: Tensor, key_pad: Tensor | None = None, return_layers: Iterable[int] = (),
                   final: bool = True) -> tuple[Tensor, dict[int, Tensor]]:
        """The encoder pass: (B, N, D) tokens -> the G global tokens appended -> blocks -> final norm.

        key_pad: (B, N) True = an empty slot kept out of attention (the global tokens never are).
        return_layers: block indices whose outputs (B, N + G, D), never normed, are returned too.
        final=False with ``return_layers``: stop after the last of them; the tokens returned are
        then that block's output, not normed. Returns ``(tokens (B, N + G, D), {block: its output})``.
        """
        B = x.shape[0]
        G = self.global_tokens.shape[1]
        x = torch.cat([x, self.global_tokens.expand(B, -1, -1).to(x.dtype)], dim=1)
        if key_pad is not None:
            key_pad = torch.cat([key_pad, key_pad.new_zeros(B, G)], dim=1)
        depth = len(self.encoder)
        want = set(return_layers)
        bad = [i for i in want if not 0 <= i < depth]
        if bad:
            raise ValueError(f"encoder layer(s) {sorted(bad)} outside 0..{depth - 1}")
        stop = max(want) + 1 if want and not final else depth
        layers = {}
        for i in range(stop):
            x = self.encoder[i](x, key_pad)
            if i in want:
                layers[i] = x
        return (self.encoder_norm(x) if stop == depth else x), layers

    def encode_all(self, batch: Mapping[str, Any], return_layers: Sequence[int] = (), final: bool = True
                   ) -> EncoderOutput:
        """Every token of every input (all must be in ``batch``; other keys are ignored) through
        the encoder, no masking. ``final=False``: stop after the last block in ``return_layers``
        (``last`` is then that block's output, not normed) -- what a DPT head needs."""
        missing = [sp.key for sp in self.input_specs.values() if sp.key not in batch]
        if missing:
            raise KeyError(f"batch has no {missing[0]!r} (encoder inputs: {list(self.input_specs)}); "
                           f"keys: {sorted(batch)}")
        size = image_size_of(self.input_specs.values(), batch)
        tokens, layout = self.tokenize(batch, list(self.input_specs))
        pad = None
        if isinstance(batch, Batch) and any(batch.has_absent(self.input_specs[s.name].key) for s in layout):
            pad = torch.cat([batch.absent(self.input_specs[s.name].key, s.length, tokens.device) for s in layout], dim=1)
        last, layers = self.run_blocks(tokens, pad, return_layers, final)
        return EncoderOutput(last, layers, layout, size, pad)


def image_size_of(specs: Iterable[M.ModalitySpec], batch: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of the full-resolution image implied by the batch's tensors of the spatial modalities
    among ``specs`` (a 1/stride modality counts at full resolution); all must agree."""
    specs = list(specs)
    sizes = {}
    for s in specs:
        t = batch.get(s.key)
        if isinstance(t, Tensor) and s.is_spatial and t.ndim >= 3:
            sizes[s.key] = (t.shape[-2] * s.stride, t.shape[-1] * s.stride)
    if not sizes:
        names = sorted(dict.fromkeys(s.name for s in specs))
        raise ValueError(f"batch has no image modality among {names}; keys: {sorted(batch)}")
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{k}: {h}x{w}" for k, (h, w) in sizes.items())
        raise ValueError(f"modalities imply different image sizes ({desc}); semseg-like inputs are at 1/stride")
    return next(iter(sizes.values()))
