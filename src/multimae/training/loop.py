"""The pretraining loop: ``pretrain(config) -> run directory``.

Rank-aware (torchrun + DDP), resumable to the exact step (weights, optimizer, schedule, RNG and
data position live in every checkpoint), logging to a progress bar, ``metrics.jsonl`` and
TensorBoard. The loop never looks at modality names: it moves ``(batch, plan)`` pairs from the
loader (:mod:`multimae.data.loader`) into :func:`multimae.training.step.train_step`.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from multimae import config as config_lib
from multimae import distributed as D
from multimae import parallel as P
from multimae.batch import Batch
from multimae.checkpoint import find_latest, resolve_checkpoint, restore_rng_state, save_checkpoint
from multimae.data.loader import BatchSpec, build_loader, data_counts, load_text_tokenizer
from multimae.masking import MaskPlan
from multimae.model import MultiMAE
from multimae.perf import tune_malloc
from multimae.training.config import PretrainConfig
from multimae.training.logging import Progress, RunLogger
from multimae.training.optim import WarmupCosine, build_optimizer, scaled_lr
from multimae.training.state import train_state
from multimae.training.step import train_step


def _move(batch: Batch, plan: MaskPlan, device: torch.device) -> tuple[Batch, MaskPlan]:
    return batch.to(device), plan.to(device)


class Trainer:
    """Holds the state of one pretraining run. ``fit()`` trains until the schedule or
    ``train.max_steps`` ends and returns the run directory."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.info = D.init_distributed()
        t = cfg.train
        self.device = self.info.device if t.device == "auto" else torch.device(t.device)
        if t.tune_malloc:
            tune_malloc()
        _size_text_vocabulary(cfg)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = MultiMAE(cfg.model).to(self.device)
        # [parallel hook 1/5] activation checkpointing + FSDP sharding, in place, before the optimizer
        # is built (FSDP replaces the parameters); a no-op for train.parallel=ddp without checkpointing
        P.prepare_model(self.model, t, self.info)
        if cfg.data.image_size is None:  # the data follow the model unless set on purpose
            cfg.data.image_size = self.model.config.image_size
        self.run_dir = Path(t.out_dir) / t.run_name
        self.loader, self.position = build_loader(cfg.data, cfg.mask, BatchSpec.of(self.model), t.seed, t.batch_size,
                                                   self.info.rank, self.info.world_size)
        self.steps_per_epoch = max(1, len(self.position) // cfg.optim.accum_steps)
        self.total_steps = t.epochs * self.steps_per_epoch
        o = cfg.optim
        global_batch = t.batch_size * self.info.world_size * o.accum_steps
        self.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, global_batch)
        self.optimizer = build_optimizer(self.model, lr=self.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                         implementation=o.implementation, no_decay_norm_bias=not o.decay_norm_bias,
                                         no_decay_names=sorted(self.model.no_weight_decay()))
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * self.steps_per_epoch)
        self.scheduler = WarmupCosine(self.optimizer, self.total_steps, min(warmup, self.total_steps), o.min_lr,
                                      warmup_start_lr=o.warmup_lr)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.step = 0
        self._rng_after_resume: dict | None = None
        self._resume()
        if self.cfg.train.init and self.step == 0:  # a fresh run starting from other weights
            from multimae.checkpoint.pretrained import init_from

            report = init_from(self.model, self.cfg.train.init)
            if self.info.is_main:
                print("init: " + "\n".join(report.lines()), flush=True)
        torch.manual_seed(D.rank_seed(t.seed, self.info.rank) + self.step)  # drop-path noise per rank
        # [parallel hook 2/5] DDP around the model (ddp, several ranks), else the (maybe sharded) model
        self.net: torch.nn.Module = P.wrap(self.model, t, self.info)
        if t.compile:
            self.net = torch.compile(self.net, backend=t.compile_backend)

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        r = self.cfg.train.resume
        if not r:
            return
        path = find_latest(self.run_dir) if r == "auto" else resolve_checkpoint(r)
        if path is None:
            return
        # [parallel hook 3/5] a DDP checkpoint as before; an FSDP one (sharded/) through DCP on every rank
        self.step, self._rng_after_resume = P.restore(path, self.model, self.optimizer, self.scheduler, self.scaler)
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Path | None:
        """Checkpoint on rank 0 (all ranks hold the same weights under DDP)."""
        meta = {"config": config_lib.to_dict(self.cfg), "epoch": self.step // self.steps_per_epoch,
                "model_config": config_lib.to_dict(self.model.config)}
        if P.is_sharded(self.model):  # [parallel hook 4/5] FSDP: every rank writes its shard (collective)
            return P.save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                  meta, self.cfg.train.keep_last)
        if not self.info.is_main:
            return None
        state = train_state(self.optimizer, self.scheduler, self.scaler, self.step)
        return save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, meta, self.cfg.train.keep_last)

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Yields lists of ``accum_steps`` (batch, plan) micro-batches, from the current step on;
        each epoch starts where the step counter says (exact position after a resume)."""
        accum = self.cfg.optim.accum_steps
        while True:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            self.position.set_epoch(epoch, pos * accum)
            group = []
            for b, p in self.loader:
                group.append(_move(b, p, self.device))
                if len(group) == accum:
                    yield group
                    group = []

    def fit(self) -> Path:
        t = self.cfg.train
        last = self.total_steps if t.max_steps is None else min(self.total_steps, t.max_steps)
        if self._rng_after_resume:
            restore_rng_state(self._rng_after_resume)
        logger = RunLogger(self.run_dir, enabled=self.info.is_main)
        if self.info.is_main:
            config_lib.save_json(self.cfg, self.run_dir / "config.json")
            print(f"run {self.run_dir}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, "
                  f"{self.steps_per_epoch} steps/epoch, {self.total_steps} total, lr {self.lr:.3g}, "
                  f"world size {self.info.world_size}", flush=True)
        progress = Progress(last, initial=self.step, enabled=self.info.is_main, log_every=t.log_every)
        imgs_per_step = t.batch_size * self.info.world_size * self.cfg.optim.accum_steps
        no_sync = getattr(self.net, "no_sync", None)
        tic = time.perf_counter()
        batches = self._batches()
        while self.step < last:
            micro = next(batches)
            stats = train_step(self.net, micro, self.optimizer, scheduler=self.scheduler, precision=t.precision,
                               scaler=self.scaler, clip_grad=self.cfg.optim.clip_grad, step=self.step, no_sync=no_sync)
            self.step += 1
            progress.update(1, loss=stats["loss"], lr=stats["lr"], imgs=imgs_per_step)
            if self.step % t.log_every == 0 or self.step == last:
                dt = time.perf_counter() - tic
                stats["imgs_per_s"] = imgs_per_step * t.log_every / max(dt, 1e-9)
                stats["epoch"] = self.step / self.steps_per_epoch
                stats.update(data_counts(self.loader.dataset))
                logger.log_scalars(self.step, stats)
                tic = time.perf_counter()
            if t.vis_every and self.step % t.vis_every == 0 and self.info.is_main:
                self._log_figure(logger)
            if self.step % t.ckpt_every == 0 or self.step == last:
                self.save()
        progress.close()
        counts = data_counts(self.loader.dataset)
        if self.info.is_main and any(counts.values()):
            print(f"data: {counts['data/invalid_pixels']} invalid pixel(s) (NaN/inf) set to 0, "
                  f"{counts['data/skipped']} bad sample(s) skipped (metrics.jsonl: data/*)", flush=True)
        # [parallel hook 5/5] FSDP: rank 0 goes on with a plain copy of the trained weights (collective),
        # for the figure here and finish_run (rank 0 alone); a no-op for ddp
        self.model = P.unsharded_copy(self.model)
        if self.info.is_main:
            self._log_figure(logger)
        logger.close()
        D.barrier()
        return self.run_dir

    def _log_figure(self, logger: RunLogger) -> None:
        try:
            from multimae.viz import reconstruction_figure
        except ImportError:  # pragma: no cover - viz is optional at import time
            return
        fig = reconstruction_figure(self.model, self.cfg, num_samples=2)
        if fig is not None:  # None: no held-out data (already said once)
            logger.log_image(self.step, "reconstruction", fig)


def _size_text_vocabulary(cfg: PretrainConfig) -> None:
    """A text modality whose vocabulary size the config leaves open takes the tokenizer's."""
    from multimae import modalities as M

    for name in set(cfg.model.inputs) | set(cfg.model.outputs):
        spec = M.registered().get(name)
        over = cfg.model.modalities.get(name, {})
        kind = over.get("kind", spec.kind if spec else None)
        if kind == "text" and "num_classes" not in over:
            vocab = load_text_tokenizer(cfg.data.tokenizer).get_vocab_size()
            cfg.model.modalities = {**cfg.model.modalities, name: {**over, "num_classes": vocab}}


def pretrain(cfg: PretrainConfig) -> Path:
    """Train a MultiMAE as ``cfg`` says; returns the run directory (checkpoints, logs, config)."""
    return Trainer(cfg).fit()
