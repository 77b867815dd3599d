"""Typed run configuration of ``multimae pretrain`` (YAML files in configs/pretrain/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from multimae.data.config import DataConfig, MaskConfig
from multimae.engine.config import OptimConfig, RunConfig, upgrade_saved_config  # noqa: F401 (re-exported)
from multimae.model.multimae import ModelConfig


@dataclass
class TrainConfig(RunConfig):
    """The run of a pretraining (:class:`~multimae.engine.config.RunConfig`) and what only
    pretraining does: figures, the end-of-run held-out evaluation, starting from other weights."""

    vis_every: int = 0  # log a figure to TensorBoard every N steps (0: only at the end)
    eval_at_end: bool = True
    figure_at_end: bool = True
    # weights to start a fresh run from: a MAE / timm ViT, an official checkpoint, a run or a
    # save_pretrained directory (multimae.checkpoint.pretrained.init_from); resuming ignores it
    init: str | None = None


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
