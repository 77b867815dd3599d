"""MultiMAE: per-modality input adapters -> visible tokens (MaskPlan) -> ViT encoder -> per-task
decoders -> losses on masked tokens.

``forward`` is orchestration only; every step is a method or a function of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from multimae import modalities as M
from multimae.adapters.input import build_input_adapter
from multimae.adapters.output import EncodedTokens, Segment, SpatialDecoder
from multimae.adapters.text import SharedDecoder, TextDecoder
from multimae.batch import Batch
from multimae.layers.attention import Block, set_attention
from multimae.losses import masked_mean, token_loss
from multimae.masking import MaskPlan
from multimae.presets import preset as get_preset


@dataclass
class ModelConfig:
    """Architecture of a MultiMAE. Size fields left ``None`` come from ``preset``.

    ``modalities`` changes registered specs or declares new ones, e.g.
    ``{"semseg": {"num_classes": 21}, "normals": {}}`` or a full spec dict for a new name.
    """

    preset: str = "base"
    dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    patch_size: int = 16
    image_size: int = 224  # size the position tables are built for; other sizes are resampled
    num_global_tokens: int = 1
    inputs: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    outputs: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    use_task_queries: bool = True
    # "per_task": MultiMAE, one cross-attention decoder per task; "shared": M3AE, one transformer
    # decoder over all modalities with per-modality mask tokens and linear heads
    decoder: Literal["per_task", "shared"] = "per_task"
    loss_weights: dict[str, float] = field(default_factory=dict)
    # tasks whose decoder runs in fp32 even under mixed-precision autocast (official recipe:
    # ``fp32_output_adapters: semseg``); per-task decoders only
    fp32_outputs: list[str] = field(default_factory=list)
    # a final LayerNorm after the encoder blocks: MultiMAE has none; MAE / timm ViTs do (kept when
    # their weights are imported, so features match theirs; see multimae.checkpoint.vit)
    encoder_norm: bool = False
    # LayerNorm eps of the encoder blocks and the final norm (1e-6: MultiMAE / MAE / timm;
    # transformers' ViT and ViTMAE use 1e-12, read from their config.json)
    norm_eps: float = 1e-6
    # attention kernel of every layer: "auto" (explicit softmax(qk)v for CPU bf16/fp16, where it
    # is faster, fused SDPA elsewhere), "fused" or "manual"; same values up to rounding
    attention: Literal["auto", "fused", "manual"] = "auto"

    def resolved(self) -> "ModelConfig":
        """A copy with every size filled in from the preset."""
        p = get_preset(self.preset)
        d = dict(self.__dict__)
        for k, v in p.items():
            if d.get(k) is None:
                d[k] = v
        return ModelConfig(**d)

    def specs(self, names: Sequence[str]) -> list[M.ModalitySpec]:
        out = []
        for n in names:
            over = dict(self.modalities.get(n, {}))
            if n in M.registered():
                out.append(M.get(n).with_(**over) if over else M.get(n))
            else:
                if not over:
                    raise KeyError(f"unknown modality {n!r}; registered: {sorted(M.registered())}; "
                                   f"declare it under model.modalities.{n} (kind, channels, ...)")
                out.append(M.ModalitySpec(name=n, **over))
        return out


@dataclass
class Outputs:
    """Result of a forward pass.

    preds: task -> prediction ((B, C, H, W) values, (B, K, H/s, W/s) logits, (B, L, V) logits).
    plan: the masks used (True = not encoded).
    encoded: the encoder output and token bookkeeping.
    losses: task -> scalar loss (only tasks whose target is in the batch); ``loss`` their
        weighted sum (None when losses were not asked for).
    """

    preds: dict[str, Tensor]
    plan: MaskPlan
    encoded: EncodedTokens
    losses: dict[str, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None


class MultiMAE(nn.Module):
    """Multi-modal multi-task masked autoencoder (Bachmann et al., 2022)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
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
        self.reset_parameters()

    def _build_decoder(self, spec: M.ModalitySpec) -> nn.Module:
        cfg = self.config
        cls = TextDecoder if spec.kind == "text" else SpatialDecoder
        return cls(spec, list(self.input_specs), cfg.dim, cfg.decoder_dim, cfg.decoder_depth,
                              cfg.decoder_heads, cfg.mlp_ratio, cfg.patch_size, cfg.image_size, cfg.use_task_queries)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: xavier-uniform linears (q, k, v treated as separate
        matrices), patch projections initialised like linears, 0.02 truncated normal tokens."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                parts = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / (m.weight.shape[0] // parts + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        for name, p in self.named_parameters():
            if "task_embeddings" in name or "type_emb" in name:
                nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ weights in and out
    @classmethod
    def from_pretrained(cls, source: Any, **overrides: Any) -> "MultiMAE":
        """A model from a ``save_pretrained`` directory, a run / checkpoint directory of this
        library, an official MultiMAE ``.pth``, a MAE ``.pth`` or a timm ViT state dict;
        ``overrides`` change :class:`ModelConfig` fields on load (``image_size=384``,
        ``inputs=["rgb"]``, ``outputs=[]``). See :func:`multimae.checkpoint.pretrained.load_pretrained`."""
        from multimae.checkpoint.pretrained import load_pretrained

        return load_pretrained(source, **overrides)[0]

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
        sizes = {}
        for s in list(self.input_specs.values()) + list(self.output_specs.values()):
            t = batch.get(s.key)
            if isinstance(t, Tensor) and s.is_spatial and t.ndim >= 3:
                sizes[s.key] = (t.shape[-2] * s.stride, t.shape[-1] * s.stride)
        if not sizes:
            raise ValueError(f"batch has no image modality among {sorted(self.input_specs)}; keys: {sorted(batch)}")
        if len(set(sizes.values())) > 1:
            desc = ", ".join(f"{k}: {h}x{w}" for k, (h, w) in sizes.items())
            raise ValueError(f"modalities imply different image sizes ({desc}); semseg-like inputs are at 1/stride")
        return next(iter(sizes.values()))

    # ------------------------------------------------------------------ forward
    def tokenize(self, batch: dict[str, Any], names: Sequence[str]) -> tuple[Tensor, list[Segment]]:
        """Input tokens of ``names``, concatenated: (B, N, D), and where each modality sits."""
        toks, layout, start = [], [], 0
        p = self.config.patch_size
        for n in names:
            spec = self.input_specs[n]
            t = self.input_adapters[n](batch[spec.key])
            toks.append(t)
            layout.append(Segment(n, start, t.shape[1], spec.grid(batch[spec.key].shape, p)))
            start += t.shape[1]
        return torch.cat(toks, dim=1), layout

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
        enc = self._encode_visible(tokens, masked, layout)
        pad_all = torch.cat(pads, dim=1)
        enc.pad = pad_all if bool(pad_all.any()) else None
        return enc

    def _check_keys(self, batch: Batch) -> None:
        """A tensor under a key that is neither one of this model's modalities nor a registered
        one is an error (a typo would otherwise silently drop an input and its loss)."""
        ours = {s.key for s in (*self.input_specs.values(), *self.output_specs.values())}
        unknown = [k for k in batch if k not in ours and k not in M.registered()]
        if unknown:
            raise KeyError(f"unknown modality {unknown[0]!r} in batch; model inputs: {sorted(self.input_specs)}, "
                           f"outputs: {sorted(self.output_specs)} (padding and presence go in Batch.pad / "
                           "Batch.present, other fields in Batch.extra: multimae.batch.Batch)")

    def _encode_visible(self, tokens: Tensor, masked: Tensor, layout: list[Segment]) -> EncodedTokens:
        B, N, D = tokens.shape
        n_vis = (~masked).sum(1)
        nv = int(n_vis.max())
        ids_keep = torch.argsort(masked.to(torch.int8), dim=1, stable=True)[:, :nv]
        slot = torch.arange(nv, device=tokens.device)[None]
        visible_pad = slot >= n_vis[:, None]
        if not bool(visible_pad.any()):
            visible_pad = None
        x = tokens.gather(1, ids_keep[..., None].expand(-1, -1, D))
        G = self.global_tokens.shape[1]
        x = torch.cat([x, self.global_tokens.expand(B, -1, -1).to(x.dtype)], dim=1)
        key_pad = None if visible_pad is None else torch.cat([visible_pad, visible_pad.new_zeros(B, G)], dim=1)
        for blk in self.encoder:
            x = blk(x, key_pad)
        return EncodedTokens(self.encoder_norm(x), ids_keep, visible_pad, masked, layout, G)

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
        """batch: a :class:`~multimae.batch.Batch`, or a plain dict modality key -> tensor (see
        :mod:`multimae.modalities`); plan: which tokens to hide (None: encode all tokens of the
        given modalities); tasks: decoders to run (default all)."""
        batch = Batch.of(batch)
        enc = self.encode(batch, plan)
        preds = self.decode(enc, self.image_size_of(batch), tasks)
        used = MaskPlan({s.name: enc.masked[:, s.start:s.end] for s in enc.layout})
        out = Outputs(preds, used, enc)
        if compute_loss:
            out.losses = self.losses(preds, batch, out.plan)
            if out.losses:
                w = self.config.loss_weights
                out.loss = sum(w.get(t, 1.0) * l for t, l in out.losses.items())
        return out

    def losses(self, preds: dict[str, Tensor], batch: Batch | dict[str, Any], plan: MaskPlan) -> dict[str, Tensor]:
        """Per-task loss on the tokens hidden from the encoder (all tokens if the task's
        modality was not an input); tokens that do not exist (padding, absent samples) never count."""
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
        return out
