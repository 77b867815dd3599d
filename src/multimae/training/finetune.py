"""The fine-tuning loop: ``finetune(config) -> run directory``.

A fine-tune is the pretraining engine with a head and another loss: the same
:func:`~multimae.training.step.train_step` (accumulation, clipping, autocast, non-finite checks)
drives a :class:`FinetuneObjective` (transfer model + task loss + mixup), optimised by AdamW with
layer-wise lr decay under the warm-up + cosine :class:`~multimae.training.optim.WarmupCosine`.
Rank-aware (torchrun + DDP), resumable to the exact step (weights, optimizer, schedule, RNG and
data position are in every checkpoint), logging to a progress bar, ``metrics.jsonl`` and
TensorBoard, and ending with ``eval.md`` / ``eval.json`` (metrics on ``data.split`` next to a
trivial baseline).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimae import config as config_lib
from multimae import distributed as D
from multimae import parallel as P
from multimae.checkpoint import CheckpointError, find_latest, resolve_checkpoint, restore_rng_state, save_checkpoint
from multimae.data.downstream import TARGET, TARGET_VALID
from multimae.layers.attention import set_attention
from multimae.perf import tune_malloc
from multimae.training.finetune_config import FinetuneConfig, target_of
from multimae.training.logging import Progress, RunLogger
from multimae.training.optim import WarmupCosine, build_optimizer, scaled_lr
from multimae.training.state import train_state
from multimae.training.step import train_step
from multimae.transfer import LoadReport, TransferModel, build_transfer_model

LossFn = Callable[[Tensor, dict[str, Any]], Tensor]


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

        def cls_loss(pred: Tensor, batch: dict[str, Any]) -> Tensor:
            t = batch[TARGET]
            if t.is_floating_point():  # mixed soft targets
                return soft(pred.float(), t)
            return F.cross_entropy(pred.float(), t, label_smoothing=smoothing)
        return cls_loss
    if name == "ce":
        ignore = cfg.data.ignore_index

        def seg_loss(pred: Tensor, batch: dict[str, Any]) -> Tensor:
            t = batch[TARGET]
            if not bool((t != ignore).any()):
                return pred.sum() * 0.0  # a batch of padding only: no gradient, no NaN
            return F.cross_entropy(pred.float(), t, ignore_index=ignore)
        return seg_loss
    if kind == "classification" or kind == "segmentation":
        raise ValueError(f"train.loss={name!r} does not fit a {kind} head (use ce)")
    if name == "berhu":
        from multimae.losses import berhu_loss

        return lambda pred, batch: berhu_loss(pred.float(), batch[TARGET], batch[TARGET_VALID])

    def l1_loss(pred: Tensor, batch: dict[str, Any]) -> Tensor:
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
    """What :func:`~multimae.training.step.train_step` reads from a forward pass."""

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


class FinetuneObjective(nn.Module):
    """Transfer model + task loss (+ mixup / cutmix on the inputs), callable as ``(batch, plan)``
    like a pretraining model, so the pretraining step, DDP and autocast apply unchanged.

    Mixup mixes every image / dense input the same way (timm mixes one tensor: the inputs are
    concatenated on channels and split back); categorical inputs cannot be mixed.
    """

    def __init__(self, model: TransferModel, loss: LossFn, task: str, mixup: Any = None) -> None:
        super().__init__()
        self.model, self.loss_fn, self.task, self.mixup = model, loss, task, mixup
        self.input_specs = list(model.encoder.specs.values())
        if mixup is not None:
            bad = [s.name for s in self.input_specs if s.kind not in ("image", "dense")]
            if bad:
                raise ValueError(f"aug.mixup / aug.cutmix cannot mix categorical or text inputs {bad}; "
                                 "set both to 0 for this input set")

    def _mix(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = [s.key for s in self.input_specs]
        x = torch.cat([batch[k] for k in keys], dim=1)
        if x.shape[0] % 2:
            raise ValueError(f"mixup needs an even batch size, got {x.shape[0]}")
        x, target = self.mixup(x, batch[TARGET])
        out = dict(batch, **{TARGET: target})
        for k, part in zip(keys, torch.split(x, [batch[k].shape[1] for k in keys], dim=1)):
            out[k] = part
        return out

    def forward(self, batch: dict[str, Any], plan: Any = None) -> StepOutput:
        if self.mixup is not None and self.training:
            batch = self._mix(batch)
        pred = self.model({s.key: batch[s.key] for s in self.input_specs})
        loss = self.loss_fn(pred, batch)
        return StepOutput(loss, {self.task: loss})


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def default_run_name(cfg: FinetuneConfig, prefix: str = "ft") -> str:
    """``<prefix>-<head kind>-<inputs>-<init name>``, e.g. ``ft-classification-rgb-synthetic-tiny``."""
    init = "scratch" if cfg.init in ("", "scratch") else Path(cfg.init.rstrip("/")).name.removesuffix(".pth")
    return f"{prefix}-{cfg.model.head.kind}-{'+'.join(cfg.model.inputs)}-{init}"


def prepare(cfg: FinetuneConfig, init: str | None = None) -> tuple[TransferModel, LoadReport, FinetuneConfig]:
    """Build the transfer model from ``init`` (default ``cfg.init``) and return the config
    completed with what the model fixed (encoder architecture read from the init, number of
    classes of the synthetic tasks, run name)."""
    from multimae.data.synthetic import LABEL_CLASSES, SEMSEG_CLASSES

    head = cfg.model.head
    if head.num_classes is None and cfg.data.source == "synthetic":
        head = replace(head, num_classes=len(LABEL_CLASSES) if head.kind == "classification"
                       else len(SEMSEG_CLASSES) if head.kind == "segmentation" else None)
    if head.kind == "dense" and cfg.model.head.out_channels == 1 and target_of(cfg) == "normals":
        head = replace(head, out_channels=3)
    cfg = replace(cfg, model=replace(cfg.model, head=head))
    model, report = build_transfer_model(cfg.model, cfg.init if init is None else init)
    cfg = replace(cfg, model=replace(cfg.model, encoder=model.encoder.config))
    if not cfg.train.run_name:
        cfg = replace(cfg, train=replace(cfg.train, run_name=default_run_name(cfg)))
    return model, report, cfg


class FinetuneTrainer:
    """State of one fine-tuning run; ``fit()`` trains to the end of the schedule (or
    ``train.max_steps``), evaluates on ``data.split`` and returns the run directory."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        from multimae.training.finetune_data import build_train_loader, check_eval_data

        self.info = D.init_distributed()
        t = cfg.train
        self.device = self.info.device if t.device == "auto" else torch.device(t.device)
        if t.tune_malloc:
            tune_malloc()
        torch.manual_seed(t.seed)  # identical head initialisation on every rank
        self.model, self.report, self.cfg = prepare(cfg)
        set_attention(self.model, t.attention)  # the kernel is the model's, per layer
        cfg, t = self.cfg, self.cfg.train
        self.model.to(self.device)
        # [parallel hook 1/5] activation checkpointing + FSDP sharding, in place, before the optimizer
        # is built (FSDP replaces the parameters); a no-op for train.parallel=ddp without checkpointing
        P.prepare_model(self.model, t, self.info)
        self.run_dir = Path(t.out_dir) / t.run_name
        self.task = target_of(cfg)
        self.input_specs = list(self.model.encoder.specs.values())
        self.loader, self.sampler, per_epoch = build_train_loader(cfg, self.input_specs, self.info.rank,
                                                                  self.info.world_size)
        check_eval_data(cfg, self.input_specs)  # a missing evaluation split fails now, not after training
        o = cfg.optim
        self.steps_per_epoch = max(1, per_epoch // o.accum_steps)
        self.total_steps = t.epochs * self.steps_per_epoch
        global_batch = t.batch_size * self.info.world_size * o.accum_steps
        self.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, global_batch)
        decay = dict(layer_decay=o.layer_decay, layer_id_fn=self.model.encoder_layer_ids(),
                     num_layers=self.model.num_layers) if o.layer_decay is not None else {}
        self.optimizer = build_optimizer(self.model, lr=self.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                         implementation=o.implementation, no_decay_norm_bias=True,
                                         no_decay_names=sorted(self.model.no_weight_decay()), **decay)
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * self.steps_per_epoch)
        self.scheduler = WarmupCosine(self.optimizer, self.total_steps, min(warmup, self.total_steps), o.min_lr)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.objective = FinetuneObjective(self.model, build_loss(cfg), self.task, build_mixup(cfg))
        self.step = 0
        self._rng_after_resume: dict | None = None
        self._resume()
        seed = D.rank_seed(t.seed, self.info.rank) + self.step
        torch.manual_seed(seed)  # drop path and mixup draw per rank
        np.random.seed(seed % 2**32)
        # [parallel hook 2/5] DDP around the objective (ddp, several ranks), else the objective itself
        self.net: nn.Module = P.wrap(self.objective, t, self.info)
        if t.compile:
            self.net = torch.compile(self.net)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        r = self.cfg.train.resume
        if not r:
            if find_latest(self.run_dir) is not None:
                raise CheckpointError(f"{self.run_dir} already holds checkpoints of another run; resume it "
                                      "(train.resume=auto), or pick another train.run_name")
            return
        path = find_latest(self.run_dir) if r == "auto" else resolve_checkpoint(r)
        if path is None:
            return
        # [parallel hook 3/5] a DDP checkpoint as before; an FSDP one (sharded/) through DCP on every rank
        self.step, self._rng_after_resume = P.restore(path, self.model, self.optimizer, self.scheduler, self.scaler)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Path | None:
        """Checkpoint on rank 0 (every rank holds the same weights under DDP)."""
        meta = {"config": config_lib.to_dict(self.cfg), "epoch": self.step // self.steps_per_epoch,
                "kind": "finetune", "task": self.task, "init_report": self.report.summary()}
        if P.is_sharded(self.model):  # [parallel hook 4/5] FSDP: every rank writes its shard (collective)
            return P.save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                  meta, self.cfg.train.keep_last)
        if not self.info.is_main:
            return None
        state = train_state(self.optimizer, self.scheduler, self.scaler, self.step)
        return save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, meta, self.cfg.train.keep_last)

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Lists of ``accum_steps`` micro-batches from the current step on (exact data position
        after a resume: each epoch starts where the step counter says)."""
        accum = self.cfg.optim.accum_steps
        while True:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch, pos * accum)
            elif hasattr(self.loader.dataset, "set_epoch"):
                self.loader.dataset.set_epoch(epoch)
            group = []
            for b, p in self.loader:
                group.append((_to(b, self.device), p))
                if len(group) == accum:
                    yield group
                    group = []

    def fit(self, evaluate: bool = True) -> Path:
        t = self.cfg.train
        last = self.total_steps if t.max_steps is None else min(self.total_steps, t.max_steps)
        if self._rng_after_resume:
            restore_rng_state(self._rng_after_resume)
        logger = RunLogger(self.run_dir, enabled=self.info.is_main)
        if self.info.is_main:
            config_lib.save_json(self.cfg, self.run_dir / "config.json")
            print(f"run {self.run_dir}: {self.report.summary()}", flush=True)
            print(f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, task {self.task} "
                  f"({self.cfg.model.head.kind}, inputs {'+'.join(self.cfg.model.inputs)}), "
                  f"{self.steps_per_epoch} steps/epoch, {self.total_steps} total, lr {self.lr:.3g}, "
                  f"layer decay {self.cfg.optim.layer_decay}, world size {self.info.world_size}", flush=True)
        progress = Progress(last, initial=self.step, enabled=self.info.is_main, log_every=t.log_every)
        imgs_per_step = t.batch_size * self.info.world_size * self.cfg.optim.accum_steps
        no_sync = getattr(self.net, "no_sync", None)
        tic = time.perf_counter()
        batches = self._batches()
        self.eval_result: dict[str, Any] | None = None
        while self.step < last:
            micro = next(batches)
            stats = train_step(self.net, micro, self.optimizer, scheduler=self.scheduler, precision=t.precision,
                               scaler=self.scaler, clip_grad=self.cfg.optim.clip_grad, step=self.step,
                               no_sync=no_sync)
            self.step += 1
            progress.update(1, loss=stats["loss"], lr=stats["lr"], imgs=imgs_per_step)
            if self.step % t.log_every == 0 or self.step == last:
                dt = time.perf_counter() - tic
                stats["imgs_per_s"] = imgs_per_step * t.log_every / max(dt, 1e-9)
                stats["epoch"] = self.step / self.steps_per_epoch
                logger.log_scalars(self.step, stats)
                tic = time.perf_counter()
            if self.step % t.ckpt_every == 0 or self.step == last:
                self.save()
            if t.eval_every and self.step % (t.eval_every * self.steps_per_epoch) == 0 and self.step < last:
                self._evaluate(logger, final=False)
        progress.close()
        if evaluate and self.step == self.total_steps:
            self._evaluate(logger, final=True)
        logger.close()
        D.barrier()
        return self.run_dir

    def _evaluate(self, logger: RunLogger, final: bool) -> None:
        """Score ``data.split`` on rank 0 (others wait); the final one writes eval.md / eval.json."""
        # [parallel hook 5/5] FSDP: a plain copy of the weights on rank 0 (collective); else the model
        model = P.unsharded_copy(self.model)
        if self.info.is_main:
            from multimae.training.finetune_eval import evaluate_model, write_report

            res = evaluate_model(model, self.cfg, device=self.device)
            logger.log_scalars(self.step, {f"eval/{k}": v for k, v in res["metrics"].items()})
            if final:
                self.eval_result = res
                write_report(res, self.cfg, self.run_dir, self.step, self.report.summary())
            self.model.train()
        D.barrier()


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune as ``cfg`` says; returns the run directory (checkpoints, logs, config, eval.md)."""
    return FinetuneTrainer(cfg).fit()
