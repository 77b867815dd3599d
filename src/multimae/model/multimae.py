"""MultiMAE: per-modality input adapters -> visible tokens (MaskPlan) -> ViT encoder -> per-task
decoders -> losses on masked tokens.

``forward`` is orchestration only; every step is a method or a function of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from multimae.core import modalities as M
from multimae.core.batch import Batch
from multimae.core.masking import MaskPlan
from multimae.model.adapters.text import SharedDecoder, TextDecoder
from multimae.model.config import ModelConfig
from multimae.model.decoders import EncodedTokens, Segment, SpatialDecoder
from multimae.model.encoder import Encoder, image_size_of
from multimae.model.losses import covered_samples, masked_mean, token_loss

__all__ = ["ModelConfig", "MultiMAE", "Outputs", "image_size_of"]


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


class MultiMAE(Encoder):
    """Multi-modal multi-task masked autoencoder (Bachmann et al., 2022): the shared
    :class:`~multimae.model.encoder.Encoder` plus per-task (or one shared) decoders."""

    def __init__(self, config: ModelConfig) -> None:
        init_rng = torch.random.get_rng_state()
        cfg = config.resolved()
        output_specs = {s.name: s for s in cfg.specs(cfg.outputs)}
        unknown = sorted(set(cfg.fp32_outputs) - set(output_specs))
        if unknown:
            raise ValueError(f"model.fp32_outputs names {unknown}, which are not outputs {sorted(output_specs)}")
        if cfg.fp32_outputs and cfg.decoder == "shared":
            raise ValueError("model.fp32_outputs applies to per-task decoders; the shared decoder has one dtype")
        super().__init__(cfg)
        self.config = cfg
        self.output_specs = output_specs
        if cfg.decoder == "shared":
            self.output_adapters = nn.ModuleDict()
            self.shared_decoder = SharedDecoder(list(self.output_specs.values()), cfg.dim, cfg.decoder_dim,
                                                cfg.decoder_depth, cfg.decoder_heads, cfg.patch_size, cfg.image_size,
                                                cfg.mlp_ratio, context_names=list(self.input_specs),
                                                attention=cfg.attention)
        else:
            self.output_adapters = nn.ModuleDict({n: self._build_decoder(s) for n, s in self.output_specs.items()})
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
                   cfg.decoder_heads, cfg.mlp_ratio, cfg.patch_size, cfg.image_size, cfg.use_task_queries,
                   attention=cfg.attention)

    # ------------------------------------------------------------------ weights in and out
    @classmethod
    def from_pretrained(cls, source: Any, with_report: bool = False, **overrides: Any) -> Any:
        """The one way to load a model: eval mode, from a ``save_pretrained`` directory, a run /
        checkpoint directory of this library (or its ``model.safetensors``), an official MultiMAE
        ``.pth``, a MAE ``.pth``, a timm ViT state dict (``.pth`` / ``.safetensors``), a
        transformers ViT / ViTMAE directory or an in-memory state dict
        (:func:`multimae.checkpoint.pretrained.read_pretrained` reads them all).

        overrides: :class:`ModelConfig` fields, e.g. ``image_size=384`` (sine-cosine tables
        regenerated, learned ones resampled), ``inputs=["rgb"]`` (other input adapters dropped),
        ``outputs=[]`` (encoder only; decoders dropped), ``outputs=["rgb", "depth"]`` on a MAE
        encoder (fresh decoders, reported as added), ``num_heads`` / ``decoder_heads`` for a
        checkpoint whose head counts are not the defaults (weights do not store them).
        ``with_report=True`` returns ``(model, report)``: the
        :class:`~multimae.checkpoint.convert.ConversionReport` of what was mapped, dropped, added
        and resized. The model's ``provenance`` records the source and, for runs, the training
        data and steps."""
        from multimae.checkpoint.convert import fit_state_dict
        from multimae.checkpoint.pretrained import read_pretrained

        weights = read_pretrained(source, **overrides)
        model = cls(weights.config)
        fit_state_dict(model, weights)
        model.provenance = dict(weights.provenance or {})
        model.eval()
        return (model, weights.report) if with_report else model

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
        x, _ = self.run_blocks(x, visible_pad)
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
