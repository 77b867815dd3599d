"""Typed run configuration of ``multimae finetune`` / ``evaluate`` / ``probe`` (configs/finetune/*.yaml).

A fine-tuning run is a :class:`~multimae.model.transfer.TransferModelConfig` (encoder + inputs + head),
an ``init`` (``scratch``, a pretraining run, a checkpoint, an official ``.pth``), downstream data,
an optimizer with layer-wise lr decay, a schedule and augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from multimae.data.sources import SYNTHETIC_SPLITS
from multimae.engine.config import OptimConfig, RunConfig
from multimae.model.transfer import TransferModelConfig
from multimae.runs import target_name

#: Synthetic downstream scenes use the streams ``seed + {0, 1, 2}`` for train / val / test. Pre-
#: training uses ``train.seed`` (default 0) and ``train.seed + 10000`` (its held-out scenes), so
#: the two never share a scene unless a pretraining seed is set within 10000 of this one.
DOWNSTREAM_SEED = 1_000_000
SPLITS = SYNTHETIC_SPLITS


@dataclass
class FinetuneDataConfig:
    """Downstream data. ``train_split`` is the split trained on; ``eval_split`` the split scored at the
    end of training, by ``train.eval_every`` and by ``multimae evaluate`` (``data.eval_split=test``
    there scores the test split). ``data.split`` (pretraining's training split) is the old name of
    ``eval_split`` here: it is read as ``eval_split`` with a FutureWarning (:data:`RENAMED_KEYS`)."""

    #: old key -> (new key, why): read by :func:`multimae.core.config.from_dict` with a FutureWarning
    RENAMED_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "split": ("eval_split", "fine-tuning, probes and evaluate score data.eval_split "
                                "(data.split is pretraining's training split)")}

    source: str = "synthetic"  # a registered source (multimae.data.sources): synthetic, folder, shards
    root: str | None = None  # folder: root/<split>/<modality>/<class or all>/<name>.<ext>
    train_urls: str | None = None  # shards: training shards (brace pattern or comma list)
    eval_urls: str | None = None  # shards: shards of the evaluated split
    train_split: str = "train"  # the split trained on (and the trivial baseline's)
    eval_split: str = "val"  # the split scored (was data.split)
    # what is predicted: None -> "label" (classification), "semseg" (segmentation), "depth"
    # (depth); a dense head needs a modality name (e.g. "normals")
    target: str | None = None
    # classification: the class names, label i = classes[i]; None for a folder source: its
    # training split's class directories (or multimae_data.json's classes), recorded in the run
    classes: list[str] | None = None
    image_size: int = 64
    seed: int = DOWNSTREAM_SEED  # synthetic: streams seed+0 / +1 / +2 are train / val / test
    train_samples: int = 1024  # synthetic: scenes per split
    val_samples: int = 256
    test_samples: int = 256
    num_samples: int | None = None  # shards: training samples per epoch (default: counted)
    cache: bool = True  # synthetic: render once into memory
    num_workers: int = 1
    crop_scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area fraction (training)
    # training crop: "random_resized" (RandomResizedCrop with crop_scale) or "shorter_side" (the
    # shorter side resized to image_size, then a random square crop: the official NYUv2 depth one)
    train_crop: Literal["random_resized", "shorter_side"] = "random_resized"
    hflip: float = 0.5
    ignore_index: int = 255  # segmentation label that is never scored (also the padding label)
    # evaluation view: "auto" = letterbox (longest side resized + padded) for dense tasks, centre
    # crop for classification; "center_crop" = shorter side resized + centre square (the official
    # NYUv2 depth evaluation); "letterbox"
    eval_transform: Literal["auto", "letterbox", "center_crop"] = "auto"
    # centre crop keeps this fraction of the shorter side (0.875 = resize 256 + crop 224, official
    # ImageNet evaluation); 1.0 = the whole shorter side
    eval_crop_pct: float = 1.0
    shuffle_buffer: int = 1000  # shards
    on_error: Literal["raise", "skip"] = "raise"
    # a sample lacking an input modality: "error", "skip" (left out, counted) or "allow" (the
    # transfer model uses the inputs it has); a sample lacking the target (or a dense head's
    # main_tasks input) is left out and counted under "allow" (docs/data.md "Incomplete datasets")
    missing: Literal["error", "skip", "allow"] = "error"


def finetune_optim() -> OptimConfig:
    """Fine-tuning's optimizer defaults: AdamW with layer-wise lr decay 0.65 (official)."""
    return OptimConfig(base_lr=5e-4, min_lr=1e-6, warmup_epochs=5.0, betas=(0.9, 0.999), layer_decay=0.65)


@dataclass
class AugConfig:
    """Training augmentation beyond the paired crop + flip of ``data``."""

    randaugment: bool = False  # torchvision v2 RandAugment on the rgb input
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    # "auto": photometric operations only when there is more than one spatial input (geometric
    # ones would move rgb away from the other modalities), else all of them
    randaugment_space: Literal["auto", "all", "photometric"] = "auto"
    # colour jitter of the rgb input (training): [brightness, contrast, saturation, hue] as in
    # torchvision ColorJitter (factors 1 +- b, 1 +- c, 1 +- s, hue +- h), applied with probability
    # color_jitter_prob; then grayscale with probability grayscale_prob. null: off
    color_jitter: list[float] | None = None
    color_jitter_prob: float = 0.5
    grayscale_prob: float = 0.0
    mixup: float = 0.0  # timm Mixup alpha (classification; 0 = off)
    cutmix: float = 0.0  # timm CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1  # classification


@dataclass
class FinetuneTrainConfig(RunConfig):
    """The run of a fine-tune (:class:`~multimae.engine.config.RunConfig`, other defaults) and its
    loss, attention kernel and evaluation."""

    epochs: int = 10
    batch_size: int = 32  # per rank (per micro-batch)
    run_name: str | None = None  # None: ft-<head kind>-<inputs>-<init name>
    keep_last: int = 2
    eval_batch_size: int = 64
    loss: Literal["auto", "ce", "berhu", "l1"] = "auto"  # auto: ce / ce / berhu / l1 by head kind
    eval_every: int = 0  # evaluate every N epochs as well (0: only at the end)


@dataclass
class ProbeConfig:
    """Linear probe (``multimae probe``): BatchNorm without affine + linear on cached features."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    weight_decay: float = 0.0


@dataclass
class FinetuneConfig:
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    init: str = "scratch"  # scratch | a pretraining or fine-tuning run | checkpoint dir | .safetensors | .pth
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=finetune_optim)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def target_of(cfg: FinetuneConfig) -> str:
    """The predicted field: ``data.target`` or the head kind's default (:func:`multimae.runs.target_name`)."""
    return target_name(cfg.model.head.kind, cfg.data.target)
