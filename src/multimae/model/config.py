"""The architecture of a MultiMAE as data: :class:`ModelConfig`.

It sits below the model and the checkpoint layer: :mod:`multimae.checkpoint` reads and writes
configs (and infers them from foreign weights) without importing the model, and
:class:`multimae.model.multimae.MultiMAE` is built from one. ``multimae.model.multimae.ModelConfig`` and
``multimae.ModelConfig`` are this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from multimae.core import modalities as M
from multimae.model.presets import preset as get_preset


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
        """A copy with every size filled in from the preset, checked (:func:`validate`): every
        model is built from a resolved config, so nothing is allocated for a config that fails."""
        d = dict(self.__dict__)
        d.update({k: v for k, v in get_preset(self.preset).items() if d.get(k) is None})
        out = ModelConfig(**d)
        validate(out)
        return out

    def specs(self, names: Sequence[str]) -> list[M.ModalitySpec]:
        out = []
        for n in names:
            over = dict(self.modalities.get(n, {}))
            if n in M.registered():
                out.append(M.get(n).with_(**over) if over else M.get(n))
            elif over:
                out.append(M.ModalitySpec(name=n, **over))
            else:
                raise KeyError(f"unknown modality {n!r}; registered: {sorted(M.registered())}; "
                               f"declare it under model.modalities.{n} (kind, channels, ...)")
        return out


# Sane upper bounds: far above any published MultiMAE / ViT (ViT-22B: dim 6144, depth 48), far
# below what a typo or a hostile config.json (``depth: 1e9``) would make the process allocate.
LIMITS = {"dim": 16384, "depth": 256, "num_heads": 1024, "decoder_dim": 16384, "decoder_depth": 64,
          "decoder_heads": 1024, "patch_size": 1024, "image_size": 16384, "num_global_tokens": 1024}
MAX_CLASSES = 1 << 20  # classes of a categorical modality / vocabulary of a text one
MAX_CHANNELS = 4096
MAX_PARAMETERS = 50e9  # estimated from the sizes, before anything is built


def _bad(key: str, value: Any, why: str) -> ValueError:
    from multimae.core.config import ConfigError, short_repr

    return ConfigError(f"model.{key} = {short_repr(value)}: {why}")


def _count(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, f"expected a whole number in {low}..{high}")
    if not low <= value <= high:
        raise _bad(key, value, f"must be in {low}..{high}")
    return value


def validate(cfg: ModelConfig) -> None:
    """Check a resolved config before anything is allocated: positive sizes within
    :data:`LIMITS`, ``dim`` divisible by ``num_heads`` (decoders alike), ``image_size`` by
    ``patch_size``, modality classes / channels bounded, an estimated parameter count under
    :data:`MAX_PARAMETERS`. Raises :class:`multimae.core.config.ConfigError` naming the key and value."""
    for key, high in LIMITS.items():
        _count(key, getattr(cfg, key), 0 if key == "num_global_tokens" else 1, high)
    for dim, heads in (("dim", "num_heads"), ("decoder_dim", "decoder_heads")):
        if getattr(cfg, dim) % getattr(cfg, heads):
            raise _bad(dim, getattr(cfg, dim), f"must be divisible by model.{heads} = {getattr(cfg, heads)}")
    if cfg.image_size % cfg.patch_size:
        raise _bad("image_size", cfg.image_size, f"must be a multiple of model.patch_size = {cfg.patch_size}")
    for key, low, high in (("mlp_ratio", 0.0, 64.0), ("drop_path", 0.0, 1.0), ("norm_eps", 0.0, 1.0)):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high or \
                (key != "drop_path" and v == 0):
            raise _bad(key, v, f"expected a number in {'(' if key != 'drop_path' else '['}{low}, {high}]")
    for name, over in cfg.modalities.items():
        if not isinstance(over, dict):
            raise _bad(f"modalities.{name}", over, "expected a mapping of modality fields")
        for key, high in (("num_classes", MAX_CLASSES), ("channels", MAX_CHANNELS), ("stride", 1024),
                          ("max_len", 1 << 16), ("class_emb_dim", LIMITS["dim"])):
            if key in over:
                _count(f"modalities.{name}.{key}", over[key], 0 if key in ("num_classes", "max_len") else 1, high)
    # encoder blocks ~12 dim^2 each, decoders ~12 decoder_dim^2 per block and task
    params = 12 * cfg.depth * cfg.dim ** 2 + 12 * cfg.decoder_depth * cfg.decoder_dim ** 2 * max(1, len(cfg.outputs))
    if params > MAX_PARAMETERS:
        raise _bad("depth", cfg.depth, f"with model.dim = {cfg.dim} that is ~{params / 1e9:.0f}B parameters, over "
                   f"the limit of {MAX_PARAMETERS / 1e9:.0f}B")
