"""The architecture of a MultiMAE as data: :class:`ModelConfig`.

It sits below the model and the checkpoint layer: :mod:`multimae.checkpoint` reads and writes
configs (and infers them from foreign weights) without importing the model, and
:class:`multimae.model.MultiMAE` is built from one. ``multimae.model.ModelConfig`` and
``multimae.ModelConfig`` are this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from multimae import modalities as M
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
