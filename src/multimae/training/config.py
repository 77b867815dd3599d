"""Typed run configuration of ``multimae pretrain`` (YAML files in configs/pretrain/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from multimae.data.config import DataConfig, MaskConfig
from multimae.model import ModelConfig


@dataclass
class OptimConfig:
    base_lr: float = 1e-4  # lr = base_lr * global_batch / 256 (paper)
    lr: float | None = None  # absolute lr; overrides base_lr scaling when set
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6  # lr of the first warm-up step, rising linearly to lr (official: 1e-6)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    decay_norm_bias: bool = False  # weight decay on LayerNorm weights and biases
    clip_grad: float | None = None
    accum_steps: int = 1
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"  # AdamW kernels (auto: fused)


@dataclass
class TrainConfig:
    epochs: int = 1600
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke runs)
    batch_size: int = 256  # per rank (per micro-batch)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": trace only, no code generation)
    tune_malloc: bool = True  # keep freed memory in glibc's heap (multimae.perf.tune_malloc)
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = "pretrain"
    resume: str | None = "auto"  # "auto": latest checkpoint of the run if any; a path; null
    ckpt_every: int = 500  # optimizer steps
    keep_last: int = 3
    log_every: int = 20
    vis_every: int = 0  # log a figure to TensorBoard every N steps (0: only at the end)
    eval_at_end: bool = True
    figure_at_end: bool = True
    device: str = "auto"
    # "ddp": every rank holds the whole model; "fsdp": FSDP2, parameters / gradients / optimizer state
    # sharded over the ranks, per transformer block (multimae.parallel)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass
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


def upgrade_saved_config(d: dict) -> dict:
    """A run config saved by an earlier version, in the current schema (a copy; unknown keys stay
    unknown and are reported by ``from_dict``). ``train.attention`` became ``model.attention``."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    train = d.get("train")
    if isinstance(train, dict) and "attention" in train:
        mode = train.pop("attention")
        model = d.setdefault("model", {})
        if isinstance(model, dict):
            model.setdefault("attention", mode)
    return d
