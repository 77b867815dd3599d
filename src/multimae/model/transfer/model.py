"""Transfer models: a MultiMAE encoder over every token of the given modalities plus one head.

The encoder is this library's MultiMAE encoder (:class:`multimae.model.encoder.Encoder`) without
decoders and without masking (what the official fine-tuning code calls MultiViT): per-modality
input adapters -> tokens of all given modalities, concatenated in the order of
``TransferModelConfig.inputs`` -> the global token(s) appended -> pre-norm transformer blocks
(stochastic depth) -> no final norm. :class:`TransferModel` *is* that encoder plus a ``head``, so
its parameters carry pretraining's names -- ``input_adapters.*``, ``global_tokens``,
``encoder.<i>.*``, ``encoder_norm.*`` -- and ``head.*``: a pretraining run's weights load
without renaming (as MAE's fine-tuning ViT shares its pretraining encoder's names).

For layer-wise lr decay (:func:`multimae.model.layers.layer_decay.vit_layer_id`):
``input_adapters.*`` and ``global_tokens`` are layer 0, ``encoder.<i>.*`` layer i+1, everything
under ``head.`` the last layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from multimae.model.config import ModelConfig
from multimae.model.decoders import Segment
from multimae.model.encoder import Encoder, EncoderOutput
from multimae.model.heads import ClassificationHead, DPTHead, SegmentationHead, default_hooks, default_layer_dims
from multimae.model.heads.classification import mean_existing
from multimae.model.layers.layer_decay import vit_layer_id

HeadKind = Literal["classification", "segmentation", "depth", "dense"]


@dataclass
class HeadConfig:
    """Which head, and its sizes (``None`` = the official design scaled to the encoder).

    kind: ``classification`` (pool -> LayerNorm -> linear), ``segmentation`` (ConvNeXt head),
        ``depth`` / ``dense`` (DPT regression head; ``dense`` is any dense target, e.g. normals).
    num_classes: classes of a classification or segmentation head.
    out_channels: regression channels of a DPT head (depth 1, normals 3).
    main_tasks: input modalities whose tokens feed the segmentation / DPT head (several are
        concatenated on channels). The paper reads rgb even with multi-modal input.
    use_global: classification from the last global token instead of the mean of all tokens.
    embed_dim: segmentation up-projection width (default 8 x dim = the official 6144 for ViT-B).
    preds_per_patch: segmentation pixels per token at the intermediate map (16 -> 4x4 blocks).
    num_blocks: ConvNeXt blocks of the segmentation head.
    hooks: DPT's four 0-based encoder blocks (default evenly spaced, ending at the last block:
        [2, 5, 8, 11] for depth 12). Blocks after the last hook are not run (and get no
        gradient: under DDP such hooks need ``find_unused_parameters``).
    layer_dims: DPT level widths (default [dim/8, dim/4, dim/2, dim] = official for ViT-B).
    feature_dim: DPT fusion width (default dim/3 rounded to a multiple of 8, between 32 and 256:
        the official 256 for ViT-B and larger, 40 for the nano preset, where the fusion path
        otherwise costs several times the encoder).
    """

    kind: HeadKind = "classification"
    num_classes: int | None = None
    out_channels: int = 1
    main_tasks: list[str] = field(default_factory=lambda: ["rgb"])
    use_global: bool = False
    embed_dim: int | None = None
    preds_per_patch: int = 16
    num_blocks: int = 4
    hooks: list[int] | None = None
    layer_dims: list[int] | None = None
    feature_dim: int | None = None


@dataclass
class TransferModelConfig:
    """A transfer model: encoder architecture, the modalities given at transfer time, a head.

    encoder: the MultiMAE architecture (its ``inputs``/``outputs``/decoder fields are ignored).
        ``None``: read it from the ``init`` checkpoint (:func:`multimae.model.transfer.build_transfer_model`).
    inputs: modalities fed to the encoder, any subset (a modality the checkpoint has no input
        projection for gets a fresh one).
    drop_path: stochastic-depth rate of the last block (linearly increasing from 0).
    attention: the attention kernel of every layer, as ``ModelConfig.attention`` (pretraining's
        ``model.attention``).
    """

    encoder: ModelConfig | None = None
    inputs: list[str] = field(default_factory=lambda: ["rgb"])
    head: HeadConfig = field(default_factory=HeadConfig)
    drop_path: float = 0.1
    attention: Literal["auto", "fused", "manual"] = "auto"


class TransferEncoder(Encoder):
    """The MultiMAE encoder over all tokens of ``inputs``: input adapters, global tokens, blocks.

    Initialised as pretraining initialises it (:meth:`Encoder.reset_parameters`, from the RNG
    state at construction start). ``forward(batch, return_layers, final)`` ->
    :class:`~multimae.model.encoder.EncoderOutput`; the batch maps modality (its batch key) ->
    tensor and may hold other keys (targets, labels), which are ignored. ``attention``: the
    kernel of every layer (default: the encoder config's).
    """

    def __init__(self, encoder: ModelConfig, inputs: Sequence[str], drop_path: float = 0.0,
                 attention: str | None = None) -> None:
        if not inputs:
            raise ValueError("TransferEncoder: inputs is empty; give at least one modality")
        init_rng = torch.random.get_rng_state()
        cfg = replace(encoder, inputs=list(inputs), outputs=[], decoder="per_task", drop_path=drop_path,
                      attention=attention or encoder.attention).resolved()
        text = [s.name for s in cfg.specs(cfg.inputs) if not s.is_spatial]
        if text:
            raise ValueError(f"transfer inputs {text} are text: TransferModel takes image-like modalities only "
                             "(padding-aware pooling of text tokens is not implemented)")
        super().__init__(cfg)
        torch.random.set_rng_state(init_rng)
        self.reset_parameters()

    def forward(self, batch: dict[str, Any], return_layers: Sequence[int] = (), final: bool = True) -> EncoderOutput:
        return self.encode_all(batch, return_layers, final)


def build_head(cfg: HeadConfig, dim: int, depth: int) -> nn.Module:
    """The head ``cfg`` describes for an encoder of width ``dim`` and ``depth`` blocks."""
    n_tasks = len(cfg.main_tasks)
    if cfg.kind == "classification":
        if not cfg.num_classes:
            raise ValueError("head.num_classes is required for a classification head")
        return ClassificationHead(dim, cfg.num_classes, cfg.use_global)
    if cfg.kind == "segmentation":
        if not cfg.num_classes:
            raise ValueError("head.num_classes is required for a segmentation head")
        return SegmentationHead(dim * n_tasks, cfg.num_classes, cfg.embed_dim or 8 * dim, cfg.preds_per_patch,
                                cfg.num_blocks)
    if cfg.kind in ("depth", "dense"):
        hooks = list(cfg.hooks) if cfg.hooks is not None else default_hooks(depth)
        bad = [h for h in hooks if not 0 <= h < depth]
        if bad:
            raise ValueError(f"head.hooks {hooks}: block indices must be in 0..{depth - 1}")
        dims = list(cfg.layer_dims) if cfg.layer_dims is not None else default_layer_dims(dim)
        feature_dim = cfg.feature_dim or min(256, max(32, 8 * round(dim / 24)))
        return DPTHead(dim * n_tasks, cfg.out_channels, dims, feature_dim, hooks)
    raise ValueError(f"head.kind {cfg.kind!r}: expected classification, segmentation, depth or dense")


class TransferModel(TransferEncoder):
    """Encoder + head: the encoder's weights under pretraining's names, the head's under ``head.``.
    ``forward(batch)``: classification logits (B, K), segmentation logits (B, K, H, W) or
    regression (B, C, H, W); ``features(batch)``: (B, D) mean of all final tokens;
    ``encode_all(batch, ...)``: the encoder's tokens. ``config``: the
    :class:`TransferModelConfig`; ``encoder_config``: the encoder's resolved ModelConfig (inputs,
    drop path and attention kernel from ``config``)."""

    def __init__(self, cfg: TransferModelConfig) -> None:
        if cfg.encoder is None:
            raise ValueError("TransferModelConfig.encoder is None: build with build_transfer_model(cfg, init), "
                             "which reads the architecture from init")
        super().__init__(cfg.encoder, cfg.inputs, cfg.drop_path, cfg.attention)
        self.config = cfg
        if cfg.head.kind != "classification":
            missing = [t for t in cfg.head.main_tasks if t not in cfg.inputs]
            if missing or not cfg.head.main_tasks:
                raise ValueError(f"head.main_tasks {cfg.head.main_tasks} must be non-empty and among the inputs "
                                 f"{cfg.inputs}")
        self.head = build_head(cfg.head, self.dim, self.depth)

    def encoder_only(self) -> TransferEncoder:
        """A copy of the encoder without the head (e.g. to export the encoder alone)."""
        c = self.encoder_config
        enc = TransferEncoder(c, list(self.input_specs), c.drop_path, c.attention)
        enc.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("head.")})
        return enc.to(self.global_tokens.device).train(self.training)

    @property
    def num_layers(self) -> int:
        """Encoder blocks (the ``num_layers`` of layer-wise lr decay)."""
        return self.depth

    def layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay: 0 embeddings, i+1 block i, depth+1 head.

        Names may carry a DDP ``module.`` prefix."""
        name = name.removeprefix("module.")
        if name.startswith("head."):
            return self.num_layers + 1
        return vit_layer_id(name, self.num_layers)

    def encoder_layer_ids(self) -> Callable[[str], int]:
        """``param name -> layer id`` for :func:`multimae.engine.optim.param_groups` (``layer_id_fn``)."""
        return self.layer_id

    def no_weight_decay(self) -> set[str]:
        """Parameter-name fragments without weight decay (besides norms and biases)."""
        return {"global_tokens", "class_emb"}

    def _task_tokens(self, tokens: Tensor, layout: list[Segment]) -> tuple[Tensor, tuple[int, int]]:
        """(B, N+G, D) -> (B, gh*gw, D x #main tasks), the main tasks' tokens side by side on channels."""
        by_name = {s.name: s for s in layout}
        segs = [by_name[t] for t in self.config.head.main_tasks]
        grids = {s.grid for s in segs}
        if len(grids) != 1 or None in grids:
            raise ValueError(f"head.main_tasks {self.config.head.main_tasks} must be spatial with one grid, got {grids}")
        return torch.cat([tokens[:, s.start:s.end] for s in segs], dim=-1), segs[0].grid  # type: ignore[return-value]

    def forward(self, batch: dict[str, Any]) -> Tensor:
        head = self.head
        if isinstance(head, DPTHead):
            enc = self.encode_all(batch, return_layers=head.hooks, final=False)
            layers = [self._task_tokens(enc.layers[h], enc.layout) for h in head.hooks]
            return head([t for t, _ in layers], layers[0][1], enc.image_size)
        enc = self.encode_all(batch)
        if isinstance(head, SegmentationHead):
            tokens, grid = self._task_tokens(enc.last, enc.layout)
            return head(tokens, grid, enc.image_size)
        return head(enc.last, _with_globals(enc.pad, enc.last))

    def features(self, batch: dict[str, Any]) -> Tensor:
        """(B, D): mean of all final encoder tokens that exist (global included), for linear probing."""
        enc = self.encode_all(batch)
        return mean_existing(enc.last, _with_globals(enc.pad, enc.last))


def _with_globals(pad: Tensor | None, tokens: Tensor) -> Tensor | None:
    """(B, N) token padding -> (B, N + G): the global tokens appended after the modality tokens exist."""
    if pad is None:
        return None
    return torch.cat([pad, pad.new_zeros(pad.shape[0], tokens.shape[1] - pad.shape[1])], dim=1)

