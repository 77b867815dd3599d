"""Fine-tuning as a task of the engine: ``finetune(config) -> run directory``.

:class:`FinetuneTask` builds the transfer model (encoder from ``init`` + head,
:func:`multimae.tasks.transfer.prepare`), the :class:`FinetuneObjective` the step optimises
(task loss + mixup), the downstream training loader (``(Batch, None)`` micro-batches), layer-wise
lr decay over the encoder, periodic and final evaluation on ``data.eval_split`` (``eval.md`` /
``eval.json`` next to a trivial baseline). The :class:`~multimae.engine.trainer.Trainer` does the
rest (distributed set-up, AdamW + warm-up / cosine, exact resume, the loop, checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae.core.batch import Batch
from multimae.data.transfer import TARGET, TARGET_VALID
from multimae.engine import distributed as D
from multimae.engine import parallel as P
from multimae.engine.distributed import DistInfo
from multimae.engine.logging import RunLogger
from multimae.engine.trainer import Task, Trainer
from multimae.tasks.transfer import Datasets, prepare
from multimae.tasks.finetune_config import FinetuneConfig, target_of
from multimae.model.transfer import TransferModel

LossFn = Callable[[Tensor, Batch], Tensor]


def loss_name(cfg: FinetuneConfig) -> str:
    """``train.loss``, or the head kind's default: ce (classification, segmentation), berhu
    (depth), l1 (other dense targets)."""
    if cfg.train.loss != "auto":
        return cfg.train.loss
    return {"classification": "ce", "segmentation": "ce", "depth": "berhu"}.get(cfg.model.head.kind, "l1")


def build_loss(cfg: FinetuneConfig) -> LossFn:
    """``loss(pred, batch) -> scalar``. Classification: cross-entropy with label smoothing (hard
    labels) or timm's SoftTargetCrossEntropy (soft targets from mixup / cutmix, which already
    carry the smoothing); segmentation: cross-entropy ignoring ``data.ignore_index``; depth:
    berHu on valid pixels; other dense targets: L1 on valid pixels."""
    name, kind = loss_name(cfg), cfg.model.head.kind
    if name == "ce" and kind == "classification":
        from timm.loss import SoftTargetCrossEntropy

        soft, smoothing = SoftTargetCrossEntropy(), cfg.aug.label_smoothing

        def cls_loss(pred: Tensor, batch: Batch) -> Tensor:
            t = batch[TARGET]
            if t.is_floating_point():  # mixed soft targets
                return soft(pred.float(), t)
            return F.cross_entropy(pred.float(), t, label_smoothing=smoothing)
        return cls_loss
    if name == "ce":
        ignore = cfg.data.ignore_index

        def seg_loss(pred: Tensor, batch: Batch) -> Tensor:
            t = batch[TARGET]
            # the mean over labelled pixels without a host read; a batch of padding only: 0, no NaN
            n = (t != ignore).sum().clamp_min(1)
            return F.cross_entropy(pred.float(), t, ignore_index=ignore, reduction="sum") / n
        return seg_loss
    if kind == "classification" or kind == "segmentation":
        raise ValueError(f"train.loss={name!r} does not fit a {kind} head (use ce)")
    if name == "berhu":
        from multimae.model.losses import berhu_loss

        return lambda pred, batch: berhu_loss(pred.float(), batch[TARGET], batch[TARGET_VALID])

    def l1_loss(pred: Tensor, batch: Batch) -> Tensor:
        valid = batch[TARGET_VALID].expand_as(pred)
        n = valid.sum().clamp_min(1)
        return ((pred.float() - batch[TARGET]).abs() * valid).sum() / n
    return l1_loss


def build_mixup(cfg: FinetuneConfig) -> Any:
    """timm's Mixup / CutMix for classification (None when both alphas are 0)."""
    a = cfg.aug
    if cfg.model.head.kind != "classification" or (a.mixup <= 0 and a.cutmix <= 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode="batch", label_smoothing=a.label_smoothing, num_classes=int(cfg.model.head.num_classes or 0))


@dataclass
class StepOutput:
    """What :func:`~multimae.engine.step.train_step` reads from a forward pass."""

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


class FinetuneObjective(nn.Module):
    """Transfer model + task loss, callable as ``(batch, plan)`` like a pretraining model, so the
    pretraining step, DDP, autocast and ``torch.compile(fullgraph=True)`` apply unchanged.

    Mixup / cutmix (``mixup``) is applied by :meth:`mix` in the data path, before the step
    (:class:`MixedLoader`): timm draws its parameters on the host, which a compiled forward could
    not take whole. It mixes every image / dense input the same way (timm mixes one tensor: the
    inputs are concatenated on channels and split back); categorical inputs cannot be mixed.
    """

    def __init__(self, model: TransferModel, loss: LossFn, task: str, mixup: Any = None) -> None:
        super().__init__()
        self.model, self.loss_fn, self.task, self.mixup = model, loss, task, mixup
        self.input_specs = list(model.input_specs.values())
        if mixup is not None:
            bad = [s.name for s in self.input_specs if s.kind not in ("image", "dense")]
            if bad:
                raise ValueError(f"aug.mixup / aug.cutmix cannot mix categorical or text inputs {bad}; "
                                 "set both to 0 for this input set")

    def mix(self, batch: Batch) -> Batch:
        """The batch with its inputs and targets mixed (as is without ``mixup``)."""
        if self.mixup is None:
            return batch
        keys = [s.key for s in self.input_specs]
        x = torch.cat([batch[k] for k in keys], dim=1)
        if x.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch size, got {x.shape[0]}")
        x, target = self.mixup(x, batch[TARGET])
        parts = dict(zip(keys, torch.split(x, [batch[k].shape[1] for k in keys], dim=1)))
        # a mixed sample has an input modality when either of its two sources has it
        present = {k: v | v.flip(0) for k, v in batch.present.items()}
        return Batch({**batch.tensors, **parts, TARGET: target}, present=present, extra=batch.extra)

    def forward(self, batch: Batch, plan: Any = None) -> StepOutput:
        pred = self.model(batch.select([s.key for s in self.input_specs]))  # presence kept (data.missing=allow)
        loss = self.loss_fn(pred, batch)
        return StepOutput(loss, {self.task: loss})


class MixedLoader:
    """A training loader whose batches pass through ``mix`` (the objective's mixup) as they are
    drawn, in the main process and in step order (so a resumed run mixes as an uninterrupted one)."""

    def __init__(self, loader: Any, mix: Callable[[Batch], Batch]) -> None:
        self.loader, self.mix = loader, mix

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, plan in self.loader:
            yield self.mix(batch), plan


class FinetuneTask(Task):
    """A fine-tuning run of ``cfg``; ``datasets(split, train) -> map-style dataset`` replaces the
    configured source's raw datasets (an injection point for benchmarks and custom data)."""

    # what only the evaluation reads (the evaluated split and its view), and the probe's own section
    schedule_only = frozenset({"train.eval_every", "train.eval_batch_size", "data.eval_split", "data.eval_transform",
                               "data.eval_crop_pct", "data.val_samples", "data.test_samples", "probe.*"})

    def __init__(self, cfg: FinetuneConfig, datasets: Datasets | None = None) -> None:
        self.cfg, self.datasets = cfg, datasets
        self.eval_result: dict[str, Any] | None = None
        self._baseline: dict[str, Any] | None = None

    def build(self, device: torch.device, info: DistInfo) -> None:
        from multimae.tasks.finetune_data import check_eval_data

        self.model, self.report, self.cfg = prepare(self.cfg)
        self.task = target_of(self.cfg)
        self.input_specs = list(self.model.input_specs.values())
        check_eval_data(self.cfg, self.input_specs, self.datasets)  # a missing split fails now, not after training
        self.objective = FinetuneObjective(self.model, build_loss(self.cfg), self.task, build_mixup(self.cfg))

    def loader(self, rank: int, world_size: int) -> tuple[Any, Any]:
        from multimae.tasks.finetune_data import build_train_loader

        loader, position = build_train_loader(self.cfg, self.input_specs, rank, world_size, self.datasets)
        return (MixedLoader(loader, self.objective.mix) if self.objective.mixup is not None else loader), position

    def layer_ids(self) -> tuple[Callable[[str], int], int]:
        return self.model.encoder_layer_ids(), self.model.num_layers

    def describe(self, trainer: Trainer) -> list[str]:
        c = self.cfg
        return [f"run {trainer.run_dir}: {self.report.init_summary()}",
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, task {self.task} "
                f"({c.model.head.kind}, inputs {'+'.join(c.model.inputs)}), {trainer.steps_per_epoch} steps/epoch, "
                f"{trainer.total_steps} total, lr {trainer.lr:.3g}, layer decay {c.optim.layer_decay}, "
                f"world size {trainer.info.world_size}"]

    def checkpoint_meta(self, trainer: Trainer) -> dict[str, Any]:
        return {"kind": "finetune", "task": self.task, "init_report": self.report.init_summary()}

    def after_step(self, trainer: Trainer, logger: RunLogger) -> None:
        every = self.cfg.train.eval_every
        if every and trainer.step % (every * trainer.steps_per_epoch) == 0 and trainer.step < trainer.last_step:
            self._evaluate(trainer, logger, final=False)

    def finish(self, trainer: Trainer, logger: RunLogger, evaluate: bool) -> None:
        if evaluate and trainer.step == trainer.total_steps:
            self._evaluate(trainer, logger, final=True)

    def _evaluate(self, trainer: Trainer, logger: RunLogger, final: bool) -> None:
        """Score ``data.eval_split`` on rank 0 (others wait); the final one writes eval.md / eval.json.
        The trivial baseline is fitted once per run."""
        # FSDP, mid-run: a plain copy of the weights on rank 0 (collective; at the end the Trainer made one)
        model = self.model if final else P.unsharded_copy(self.model)
        if trainer.info.is_main:
            from multimae.tasks.finetune_eval import evaluate_model, fit_baseline, write_eval_report

            if self._baseline is None:
                self._baseline = fit_baseline(self.cfg, self.input_specs, datasets=self.datasets)
            res = evaluate_model(model, self.cfg, device=trainer.device, baseline=self._baseline,
                                 datasets=self.datasets)
            logger.log_scalars(trainer.step, {f"eval/{k}": v for k, v in res["metrics"].items()})
            if final:
                self.eval_result = res
                write_eval_report(res, self.cfg, trainer.run_dir, trainer.step, self.report.init_summary())
            self.model.train()
        D.barrier()


def finetune(cfg: FinetuneConfig, datasets: Datasets | None = None) -> Path:
    """Fine-tune as ``cfg`` says; returns the run directory (checkpoints, logs, config, eval.md)."""
    return Trainer(FinetuneTask(cfg, datasets)).fit()
