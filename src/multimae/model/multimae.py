"""MultiMAE: per-modality input adapters -> visible tokens (MaskPlan) -> ViT encoder -> per-task
decoders -> losses on masked tokens.

``forward`` is orchestration only; every step is a method or a function of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from multimae.core import modalities as M
from multimae.model.adapters.input import build_input_adapter
from multimae.model.decoders import EncodedTokens, Segment, SpatialDecoder
from multimae.model.adapters.text import SharedDecoder, TextDecoder
from multimae.core.batch import Batch
from multimae.checkpoint.convert import ConversionReport, ConvertedWeights, fit_state_dict, read_official_multimae
from multimae.model.layers.attention import Block, set_attention
from multimae.model.layers.init import init_
from multimae.model.losses import covered_samples, masked_mean, token_loss
from multimae.core.masking import MaskPlan
from multimae.model.config import ModelConfig

__all__ = ["ModelConfig", "MultiMAE", "Outputs", "image_size_of", "load_official_multimae", "load_pretrained",
           "run_encoder", "tokenize"]


@dataclass
class Outputs:
    """Result of a forward pass.

    preds: task -> prediction ((B, C, H, W) values, (B, K, H/s, W/s) logits, (B, L, V) logits).
    plan: the masks used (True = not encoded).
    encoded: the encoder output and token bookkeeping.
    losses: task -> scalar loss (only tasks whose target is in the batch); ``loss`` their
        weighted sum (None when losses were not asked for).
    counts: task -> int64 0-dim tensor, the samples its loss covered (those with a scored
        token: the target present, and hidden from the encoder when it was an input).
    """

    preds: dict[str, Tensor]
    plan: MaskPlan
    encoded: EncodedTokens
    losses: dict[str, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None
    counts: dict[str, Tensor] = field(default_factory=dict)


class MultiMAE(nn.Module):
    """Multi-modal multi-task masked autoencoder (Bachmann et al., 2022)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        init_rng = torch.random.get_rng_state()
        cfg = self.config = config.resolved()
        self.input_specs = {s.name: s for s in cfg.specs(cfg.inputs)}
        self.output_specs = {s.name: s for s in cfg.specs(cfg.outputs)}
        for s in self.input_specs.values():
            if not s.input:
                raise ValueError(f"modality {s.name!r} is output-only and cannot be a model input")
        unknown = sorted(set(cfg.fp32_outputs) - set(self.output_specs))
        if unknown:
            raise ValueError(f"model.fp32_outputs names {unknown}, which are not outputs {sorted(self.output_specs)}")
        if cfg.fp32_outputs and cfg.decoder == "shared":
            raise ValueError("model.fp32_outputs applies to per-task decoders; the shared decoder has one dtype")
        self.input_adapters = nn.ModuleDict({
            n: build_input_adapter(s, cfg.dim, cfg.patch_size, cfg.image_size) for n, s in self.input_specs.items()})
        self.global_tokens = nn.Parameter(torch.zeros(1, cfg.num_global_tokens, cfg.dim))
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # cpu: builds under torch.device("meta") too
        self.encoder = nn.Sequential(*[Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, drop_path=d, norm_eps=cfg.norm_eps)
                                       for d in dpr])
        self.encoder_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.encoder_norm else nn.Identity()
        if cfg.decoder == "shared":
            self.output_adapters = nn.ModuleDict()
            self.shared_decoder = SharedDecoder(list(self.output_specs.values()), cfg.dim, cfg.decoder_dim,
                                                cfg.decoder_depth, cfg.decoder_heads, cfg.patch_size, cfg.image_size,
                                                cfg.mlp_ratio, context_names=list(self.input_specs))
        else:
            self.output_adapters = nn.ModuleDict({n: self._build_decoder(s) for n, s in self.output_specs.items()})
        set_attention(self, cfg.attention)
        # the weights depend on the RNG state at construction start only, not on what the submodules'
        # constructors drew: a model built on the meta device (FSDP start-up) and initialised later
        # from this state gets exactly these weights (multimae.engine.parallel.materialise)
        torch.random.set_rng_state(init_rng)
        self.init_rng_state = init_rng
        self.reset_parameters()

    def _build_decoder(self, spec: M.ModalitySpec) -> nn.Module:
        cfg = self.config
        cls = TextDecoder if spec.kind == "text" else SpatialDecoder
        return cls(spec, list(self.input_specs), cfg.dim, cfg.decoder_dim, cfg.decoder_depth,
                              cfg.decoder_heads, cfg.mlp_ratio, cfg.patch_size, cfg.image_size, cfg.use_task_queries)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform linears (q, k, v treated as separate
        matrices), patch projections initialised like linears, 0.02 truncated normal tokens, zero
        mask tokens of the per-task decoders. Every parameter is set here, through
        :func:`multimae.model.layers.init.init_` (so a sharded model gets the unsharded weights)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / (m.weight.shape[0] // parts + m.weight.shape[1]))
                init_(m.weight, nn.init.uniform_, -bound, bound)
                if m.bias is not None:
                    init_(m.bias, nn.init.zeros_)
            elif isinstance(m, nn.LayerNorm):
                init_(m.weight, nn.init.ones_)
                init_(m.bias, nn.init.zeros_)
            elif isinstance(m, nn.Conv2d):
                init_(m.weight, lambda w: nn.init.xavier_uniform_(w.view(w.shape[0], -1)))
                if m.bias is not None:
                    init_(m.bias, nn.init.zeros_)
            elif isinstance(m, nn.Embedding):
                init_(m.weight, nn.init.trunc_normal_, std=0.02)
        init_(self.global_tokens, nn.init.trunc_normal_, std=0.02)
        for name, p in self.named_parameters():
            if "task_embeddings" in name or "type_emb" in name or ".mask_tokens." in name:
                init_(p, nn.init.trunc_normal_, std=0.02)
            elif name.endswith(".mask_token"):
                init_(p, nn.init.zeros_)

    # ------------------------------------------------------------------ weights in and out
    @classmethod
    def from_pretrained(cls, source: Any, **overrides: Any) -> "MultiMAE":
        """A model (eval mode) from a ``save_pretrained`` directory, a run / checkpoint directory of
        this library, an official MultiMAE ``.pth``, a MAE ``.pth``, a timm ViT state dict or a
        transformers ViT / ViTMAE directory; ``overrides`` change :class:`ModelConfig` fields on load
        (``image_size=384``, ``inputs=["rgb"]``, ``outputs=[]``). :func:`load_pretrained` also
        returns the report; the reading and converting is
        :func:`multimae.checkpoint.pretrained.read_pretrained`."""
        from multimae.checkpoint.pretrained import read_pretrained

        return cls.from_converted(read_pretrained(source, **overrides))[0]

    @classmethod
    def from_converted(cls, weights: ConvertedWeights) -> tuple["MultiMAE", ConversionReport]:
        """The model (eval mode) that ``weights`` (read and converted by :mod:`multimae.checkpoint`)
        describe, with their tensors fitted in (position tables resized to its grid, dropped and
        fresh keys reported: :func:`multimae.checkpoint.convert.fit_state_dict`), and the report."""
        model = cls(weights.config)
        fit_state_dict(model, weights.state_dict, weights.report, weights.fresh)
        if weights.provenance is not None:
            model.provenance = dict(weights.provenance)
        return model.eval(), weights.report

    def save_pretrained(self, directory: Any, **card: Any) -> Any:
        """Write ``config.json`` + ``model.safetensors`` + ``README.md`` (a Hugging Face Hub
        layout) into ``directory``. See :func:`multimae.checkpoint.pretrained.save_pretrained`."""
        from multimae.checkpoint.pretrained import save_pretrained

        return save_pretrained(self, directory, **card)

    # ------------------------------------------------------------------ bookkeeping
    def no_weight_decay(self) -> set[str]:
        """Parameter name fragments that take no weight decay."""
        return {"global_tokens", "mask_token", "task_embeddings", "pos_emb", "class_emb", "type_emb"}

    def token_counts(self, image_size: int | tuple[int, int], text_lengths: dict[str, int] | None = None) -> dict[str, int]:
        """Tokens per input modality at an image size (text: its padded length)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        out = {}
        for n, s in self.input_specs.items():  # the token count of a tensor of this modality's shape
            shape = (1, (text_lengths or {}).get(n, s.max_len)) if s.kind == "text" else (1, h // s.stride, w // s.stride)
            out[n] = s.num_tokens(shape, self.config.patch_size)
        return out

    def image_size_of(self, batch: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of the full-resolution image implied by the batch; all spatial modalities must agree."""
        return image_size_of([*self.input_specs.values(), *self.output_specs.values()], batch)

    # ------------------------------------------------------------------ forward
    def tokenize(self, batch: dict[str, Any], names: Sequence[str]) -> tuple[Tensor, list[Segment]]:
        """Input tokens of ``names``, concatenated: (B, N, D), and where each modality sits."""
        return tokenize(self.input_adapters, self.input_specs, batch, names, self.config.patch_size)

    def _input_names(self, batch: dict[str, Any], plan: MaskPlan | None) -> list[str]:
        if plan is not None:
            for n in plan.masks:
                if n not in self.input_specs:
                    raise KeyError(f"mask given for {n!r}, which is not an input of this model "
                                   f"(inputs: {sorted(self.input_specs)})")
                if self.input_specs[n].key not in batch:
                    raise KeyError(f"mask given for {n!r} but the batch has no {self.input_specs[n].key!r}")
            return [n for n in self.input_specs if n in plan.masks]
        names = [n for n, s in self.input_specs.items() if s.key in batch]
        if not names:
            raise ValueError(f"batch has none of the model's inputs {sorted(self.input_specs)}; keys: {sorted(batch)}")
        return names

    def encode(self, batch: Batch | dict[str, Any], plan: MaskPlan | None = None) -> EncodedTokens:
        """Tokenise, keep the visible tokens and run the encoder. No plan = every token visible.

        Tokens that do not exist (text padding, a sample lacking the modality: ``Batch.pad`` /
        ``Batch.present``) are never encoded.

        Nothing here reads a device value: the encoder gets ``plan.num_visible`` slots (the plan's
        static budget; a plan without one, or no plan on a padded batch, is counted first: one
        host read, outside the training step's path), padded slots are masked
        when the plan is ``uneven`` or the batch has padding, and ``pad`` is kept when the batch
        carries padding or presence for an encoded modality.
        """
        batch = Batch.of(batch)
        self._check_keys(batch)
        names = self._input_names(batch, plan)
        self.image_size_of(batch)  # all spatial modalities must agree
        tokens, layout = self.tokenize(batch, names)
        B = tokens.shape[0]
        masks, pads = [], []
        dev = tokens.device
        for seg in layout:
            m = plan.masks[seg.name] if plan is not None else torch.zeros(B, seg.length, dtype=torch.bool)
            if tuple(m.shape) != (B, seg.length):
                raise ValueError(f"mask of {seg.name!r} has shape {tuple(m.shape)}, expected ({B}, {seg.length})")
            pad = batch.absent(self.input_specs[seg.name].key, seg.length, dev)
            pads.append(pad)
            masks.append(m.to(dev) | pad)
        masked = torch.cat(masks, dim=1)
        absent = any(batch.has_absent(self.input_specs[s.name].key) for s in layout)
        if plan is None:  # every existing token: all of them, or (padding) as many as the fullest sample has
            plan = MaskPlan({"all": masked}).counted() if absent else MaskPlan({}, masked.shape[1], False)
        elif plan.num_visible is None:
            plan = MaskPlan(plan.masks).counted()
        enc = self._encode_visible(tokens, masked, layout, plan.num_visible, plan.uneven or absent)
        enc.pad = torch.cat(pads, dim=1) if absent else None
        return enc

    def _check_keys(self, batch: Batch) -> None:
        """A tensor under a key that is neither one of this model's modalities nor a registered
        one is an error (a typo would otherwise silently drop an input and its loss)."""
        ours = {s.key for s in (*self.input_specs.values(), *self.output_specs.values())}
        unknown = [k for k in batch if k not in ours and k not in M.registered()]
        if unknown:
            raise KeyError(f"unknown modality {unknown[0]!r} in batch; model inputs: {sorted(self.input_specs)}, "
                           f"outputs: {sorted(self.output_specs)} (padding and presence go in Batch.pad / "
                           "Batch.present, other fields in Batch.extra: multimae.core.batch.Batch)")

    def _encode_visible(self, tokens: Tensor, masked: Tensor, layout: list[Segment], nv: int,
                        uneven: bool) -> EncodedTokens:
        """tokens (B, N, D), masked (B, N) -> the first ``nv`` visible tokens of every sample
        (slots past a sample's own count padded and masked when ``uneven``) through the encoder."""
        B, N, D = tokens.shape
        nv = min(nv, N)
        ids_keep = torch.argsort(masked.to(torch.int8), dim=1, stable=True)[:, :nv]
        visible_pad = None
        if uneven:
            slot = torch.arange(nv, device=tokens.device)[None]
            visible_pad = slot >= (~masked).sum(1)[:, None]
        x = tokens.gather(1, ids_keep[..., None].expand(-1, -1, D))
        x, _ = run_encoder(x, self.global_tokens, self.encoder, self.encoder_norm, visible_pad)
        return EncodedTokens(x, ids_keep, visible_pad, masked, layout, self.global_tokens.shape[1])

    def decode(self, enc: EncodedTokens, image_size: tuple[int, int], tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        p = self.config.patch_size
        grid = (image_size[0] // p, image_size[1] // p)
        if self.config.decoder == "shared":
            preds = self.shared_decoder(enc, grid)
            return {t: preds[t] for t in (tasks or self.output_specs)}
        return {t: self._decode_task(t, enc, grid) for t in (tasks or self.output_specs)}

    def _decode_task(self, task: str, enc: EncodedTokens, grid: tuple[int, int]) -> Tensor:
        """One decoder; a task in ``config.fp32_outputs`` runs outside autocast on fp32 tokens."""
        if task not in self.config.fp32_outputs:
            return self.output_adapters[task](enc, grid)
        with torch.autocast(enc.tokens.device.type, enabled=False):
            return self.output_adapters[task](replace(enc, tokens=enc.tokens.float()), grid)

    def forward(self, batch: Batch | dict[str, Any], plan: MaskPlan | None = None, tasks: Sequence[str] | None = None,
                compute_loss: bool = True) -> Outputs:
        """batch: a :class:`~multimae.core.batch.Batch`, or a plain dict modality key -> tensor (see
        :mod:`multimae.core.modalities`); plan: which tokens to hide (None: encode all tokens of the
        given modalities); tasks: decoders to run (default all)."""
        batch = Batch.of(batch)
        enc = self.encode(batch, plan)
        preds = self.decode(enc, self.image_size_of(batch), tasks)
        used = MaskPlan({s.name: enc.masked[:, s.start:s.end] for s in enc.layout})
        out = Outputs(preds, used, enc)
        if compute_loss:
            out.losses = self.losses(preds, batch, out.plan, counts=out.counts)
            if out.losses:
                w = self.config.loss_weights
                out.loss = sum(w.get(t, 1.0) * l for t, l in out.losses.items())
        return out

    def losses(self, preds: dict[str, Tensor], batch: Batch | dict[str, Any], plan: MaskPlan,
               counts: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-task loss on the tokens hidden from the encoder (all tokens if the task's
        modality was not an input); tokens that do not exist (padding, absent samples) never count.
        ``counts``: filled with task -> the samples each loss covered (a device tensor, no host read)."""
        batch = Batch.of(batch)
        out = {}
        p = self.config.patch_size
        for t, pred in preds.items():
            spec = self.output_specs[t]
            target = batch.get(spec.key)
            if target is None:
                continue
            src = next((n for n, s in self.input_specs.items() if s.key == spec.key and n in plan.masks), None)
            weight = plan.masks[src] if src is not None else None
            per_token = token_loss(pred, target, spec, spec.patch(p))
            if batch.has_absent(spec.key):
                absent = batch.absent(spec.key, per_token.shape[1], per_token.device)
                weight = (~absent if weight is None else weight & ~absent)
            out[t] = masked_mean(per_token, weight)
            if counts is not None:
                counts[t] = covered_samples(per_token, weight)
        return out


# ---------------------------------------------------------------------- the encoder pass
# One implementation for every encoder built from MultiMAE parts: MultiMAE.encode (visible tokens,
# padding) and multimae.model.transfer.TransferEncoder (all tokens, intermediate layers) call these.

def tokenize(adapters: Mapping[str, nn.Module], specs: Mapping[str, M.ModalitySpec], batch: Mapping[str, Any],
             names: Sequence[str], patch_size: int) -> tuple[Tensor, list[Segment]]:
    """Tokens of the modalities ``names`` (each through its input adapter), concatenated in that
    order: (B, N, D), and where each modality sits (its token grid, None for text)."""
    toks, layout, start = [], [], 0
    for n in names:
        spec = specs[n]
        t = adapters[n](batch[spec.key])
        toks.append(t)
        layout.append(Segment(n, start, t.shape[1], spec.grid(batch[spec.key].shape, patch_size)))
        start += t.shape[1]
    return torch.cat(toks, dim=1), layout


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


def run_encoder(x: Tensor, global_tokens: Tensor, blocks: Sequence[nn.Module], norm: nn.Module,
                key_pad: Tensor | None = None, return_layers: Iterable[int] = (), final: bool = True
                ) -> tuple[Tensor, dict[int, Tensor]]:
    """The encoder pass: (B, N, D) tokens -> the G global tokens appended -> blocks -> final norm.

    key_pad: (B, N) True = an empty slot kept out of attention (the global tokens never are).
    return_layers: block indices whose outputs (B, N + G, D), never normed, are returned too.
    final=False with ``return_layers``: stop after the last of them; the tokens returned are then
    that block's output, not normed. Returns ``(tokens (B, N + G, D), {block: its output})``.
    """
    B = x.shape[0]
    G = global_tokens.shape[1]
    x = torch.cat([x, global_tokens.expand(B, -1, -1).to(x.dtype)], dim=1)
    if key_pad is not None:
        key_pad = torch.cat([key_pad, key_pad.new_zeros(B, G)], dim=1)
    depth = len(blocks)
    want = set(return_layers)
    bad = [i for i in want if not 0 <= i < depth]
    if bad:
        raise ValueError(f"encoder layer(s) {sorted(bad)} outside 0..{depth - 1}")
    stop = max(want) + 1 if want and not final else depth
    layers = {}
    for i, blk in enumerate(blocks):
        if i == stop:
            break
        x = blk(x, key_pad)
        if i in want:
            layers[i] = x
    return (norm(x) if stop == depth else x), layers


def load_pretrained(source: Any, **overrides: Any) -> tuple[MultiMAE, ConversionReport]:
    """:meth:`MultiMAE.from_pretrained` with the :class:`~multimae.checkpoint.convert.ConversionReport`
    of what was mapped, dropped, added and resized.

    source: a ``save_pretrained`` directory, a run or checkpoint directory (or its
    ``model.safetensors``), an official MultiMAE / MAE ``.pth``, a timm ViT ``.pth`` /
    ``.safetensors``, a transformers ViT / ViTMAE directory or a state dict
    (:func:`multimae.checkpoint.pretrained.read_pretrained`). overrides: :class:`ModelConfig` fields,
    e.g. ``image_size=384`` (sine-cosine tables regenerated, learned ones resampled),
    ``inputs=["rgb"]`` (other input adapters dropped), ``outputs=[]`` (encoder only; decoders
    dropped), ``outputs=["rgb", "depth"]`` on a MAE encoder (fresh decoders, reported as added), or
    ``num_heads`` for an external checkpoint whose head count is not the ViT default. The model's
    ``provenance`` attribute records the source and, for runs, the training data and steps.
    """
    from multimae.checkpoint.pretrained import read_pretrained

    return MultiMAE.from_converted(read_pretrained(source, **overrides))


def load_official_multimae(source: Any, num_heads: int | None = None, decoder_heads: int | None = None,
                           **overrides: Any) -> MultiMAE:
    """Build a :class:`MultiMAE` from an official MultiMAE checkpoint, in one line::

        model = multimae.load_official_multimae("multimae-b_98_rgb+-depth-semseg_1600e.pth")

    ``source``: a ``.pth`` (the ``model`` entry, or a bare state_dict), a ``.safetensors``
    file, or a state_dict. Architecture is read off the tensors; head counts (not stored in
    weights) default to the standard ViT's for the encoder (another width needs ``num_heads``) and
    8 for the decoders. ``overrides`` set other :class:`ModelConfig` fields: ``image_size=384``
    regenerates the sine-cosine position tables for the new grid; ``inputs`` / ``outputs`` keep a
    subset (``outputs=[]``: encoder only). (Eval mode is not set: the model is as built.)
    """
    weights = read_official_multimae(source, num_heads, decoder_heads, **overrides)
    model = MultiMAE(weights.config)
    fit_state_dict(model, weights.state_dict, weights.report)
    return model
