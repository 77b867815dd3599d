"""Transfer models: a MultiMAE encoder over every token of the given modalities plus one head.

The encoder is this library's MultiMAE encoder without decoders and without masking (what the
official fine-tuning code calls MultiViT): per-modality input adapters -> tokens of all given
modalities, concatenated in the order of ``TransferModelConfig.inputs`` -> the global token(s)
appended -> pre-norm transformer blocks (stochastic depth) -> no final norm. The pass itself is
the model's (:func:`multimae.model.multimae.tokenize`, :func:`multimae.model.multimae.run_encoder`), so the two
cannot drift apart.

Parameter names are chosen for layer-wise lr decay with
:func:`multimae.model.layers.layer_decay.vit_layer_id`: ``encoder.input_adapters.*`` and
``encoder.global_tokens`` are layer 0, ``encoder.blocks.<i>.*`` layer i+1, everything under
``head.`` the last layer (no head parameter name contains ``blocks.<i>.`` or an embedding pattern).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from multimae.core.batch import Batch
from multimae.model.decoders import Segment
from multimae.model.heads import ClassificationHead, DPTHead, SegmentationHead, default_hooks, default_layer_dims
from multimae.model.heads.classification import mean_existing
from multimae.model.layers.layer_decay import vit_layer_id
from multimae.model.multimae import ModelConfig, MultiMAE, image_size_of, run_encoder, tokenize

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


class TransferEncoder(nn.Module):
    """MultiMAE encoder over all tokens of ``inputs``: input adapters, global tokens, blocks.

    Built through :class:`multimae.model.multimae.MultiMAE` (no decoders), so adapters and the
    initialisation are exactly those of pretraining. ``forward(batch, return_layers)`` ->
    :class:`EncoderOutput`; the batch maps modality (its batch key) -> tensor and may hold other
    keys (targets, labels), which are ignored.
    """

    def __init__(self, encoder: ModelConfig, inputs: Sequence[str], drop_path: float = 0.0) -> None:
        super().__init__()
        if not inputs:
            raise ValueError("TransferEncoder: inputs is empty; give at least one modality")
        cfg = replace(encoder, inputs=list(inputs), outputs=[], decoder="per_task", drop_path=drop_path).resolved()
        mae = MultiMAE(cfg)
        text = [n for n, sp in mae.input_specs.items() if not sp.is_spatial]
        if text:
            raise ValueError(f"transfer inputs {text} are text: TransferModel takes image-like modalities only "
                             "(padding-aware pooling of text tokens is not implemented)")
        self.config = cfg
        self.specs = mae.input_specs
        self.input_adapters = mae.input_adapters
        self.global_tokens = mae.global_tokens
        self.blocks = nn.ModuleList(list(mae.encoder))
        self.norm = mae.encoder_norm  # final LayerNorm of MAE / timm encoders; Identity for MultiMAE
        self.dim = cfg.dim
        self.depth = cfg.depth
        self.patch_size = cfg.patch_size

    def tokenize(self, batch: dict[str, Any]) -> tuple[Tensor, list[Segment], tuple[int, int]]:
        """Tokens of every input, concatenated: (B, N, D), their layout and the image size (H, W)."""
        missing = [sp.key for sp in self.specs.values() if sp.key not in batch]
        if missing:
            raise KeyError(f"batch has no {missing[0]!r} (transfer inputs: {list(self.specs)}); keys: {sorted(batch)}")
        size = image_size_of(self.specs.values(), batch)
        tokens, layout = tokenize(self.input_adapters, self.specs, batch, list(self.specs), self.patch_size)
        return tokens, layout, size

    def forward(self, batch: dict[str, Any], return_layers: Sequence[int] = (), final: bool = True) -> EncoderOutput:
        """``final=False``: stop after the last block in ``return_layers`` (``last`` is then that
        block's output, not normed) -- what a DPT head needs, without the blocks after its hooks."""
        x, layout, size = self.tokenize(batch)
        pad = None
        if isinstance(batch, Batch) and any(batch.has_absent(self.specs[s.name].key) for s in layout):
            pad = torch.cat([batch.absent(self.specs[s.name].key, s.length, x.device) for s in layout], dim=1)
        last, layers = run_encoder(x, self.global_tokens, self.blocks, self.norm, pad, return_layers, final)
        return EncoderOutput(last, layers, layout, size, pad)


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


class TransferModel(nn.Module):
    """Encoder + head. ``forward(batch)``: classification logits (B, K), segmentation logits
    (B, K, H, W) or regression (B, C, H, W); ``features(batch)``: (B, D) mean of all final tokens."""

    def __init__(self, cfg: TransferModelConfig) -> None:
        super().__init__()
        if cfg.encoder is None:
            raise ValueError("TransferModelConfig.encoder is None: build with build_transfer_model(cfg, init), "
                             "which reads the architecture from init")
        self.config = cfg
        self.encoder = TransferEncoder(cfg.encoder, cfg.inputs, cfg.drop_path)
        if cfg.head.kind != "classification":
            missing = [t for t in cfg.head.main_tasks if t not in cfg.inputs]
            if missing or not cfg.head.main_tasks:
                raise ValueError(f"head.main_tasks {cfg.head.main_tasks} must be non-empty and among the inputs "
                                 f"{cfg.inputs}")
        self.head = build_head(cfg.head, self.encoder.dim, self.encoder.depth)

    @property
    def num_layers(self) -> int:
        """Encoder blocks (the ``num_layers`` of layer-wise lr decay)."""
        return self.encoder.depth

    def layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay: 0 embeddings, i+1 block i, depth+1 head.

        Names may carry a DDP ``module.`` prefix."""
        name = name.removeprefix("module.")
        if name.startswith("encoder."):
            return vit_layer_id(name, self.num_layers)
        return self.num_layers + 1

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
            enc = self.encoder(batch, return_layers=head.hooks, final=False)
            layers = [self._task_tokens(enc.layers[h], enc.layout) for h in head.hooks]
            return head([t for t, _ in layers], layers[0][1], enc.image_size)
        enc = self.encoder(batch)
        if isinstance(head, SegmentationHead):
            tokens, grid = self._task_tokens(enc.last, enc.layout)
            return head(tokens, grid, enc.image_size)
        return head(enc.last, _with_globals(enc.pad, enc.last))

    def features(self, batch: dict[str, Any]) -> Tensor:
        """(B, D): mean of all final encoder tokens that exist (global included), for linear probing."""
        enc = self.encoder(batch)
        return mean_existing(enc.last, _with_globals(enc.pad, enc.last))


def _with_globals(pad: Tensor | None, tokens: Tensor) -> Tensor | None:
    """(B, N) token padding -> (B, N + G): the global tokens appended after the modality tokens exist."""
    if pad is None:
        return None
    return torch.cat([pad, pad.new_zeros(pad.shape[0], tokens.shape[1] - pad.shape[1])], dim=1)

