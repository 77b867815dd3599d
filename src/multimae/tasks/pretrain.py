"""Pretraining as a task of the engine: ``pretrain(config) -> run directory``.

:class:`PretrainTask` builds the MultiMAE of ``cfg.model`` (text vocabularies sized from the
tokenizer), its masked training loader (:mod:`multimae.data.loader`: ``(Batch, MaskPlan)`` pairs),
starts a fresh run from other weights when ``train.init`` says so, logs reconstruction figures,
and ends with the held-out evaluation (``eval.md``) and ``reconstruction.png``
(:mod:`multimae.tasks.pretrain_report`). The :class:`~multimae.engine.trainer.Trainer` does the
rest (distributed set-up, optimizer, exact resume, the loop, checkpoints).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from multimae.core import config as config_lib
from multimae.data.config import epoch_samples
from multimae.data.loader import BatchSpec, build_loader, coverage_line, data_counts, load_text_tokenizer
from multimae.engine.distributed import DistInfo
from multimae.engine.logging import RunLogger
from multimae.engine.trainer import Task, Trainer
from multimae.model.multimae import MultiMAE
from multimae.tasks.pretrain_config import PretrainConfig


class PretrainTask(Task):
    """A MultiMAE (or M3AE) pretraining run of ``cfg``."""

    # what only the figures and the end-of-run evaluation read
    schedule_only = frozenset({"train.vis_every", "train.eval_at_end", "train.figure_at_end", "data.val_split",
                               "data.val_samples"})
    meta_init = True  # under FSDP the Trainer builds the model on the meta device (engine.parallel.materialise)

    def __init__(self, cfg: PretrainConfig) -> None:
        self.epoch_note = "data.num_samples" if cfg.data.num_samples is not None else "counted in the shards"
        self.cfg = completed_config(cfg)
        self.result: dict[str, Any] = {}

    def build(self, device: torch.device, info: DistInfo) -> None:
        self.model = self.objective = MultiMAE(self.cfg.model)
        if self.cfg.data.image_size is None:  # the data follow the model unless set on purpose
            self.cfg = replace(self.cfg, data=replace(self.cfg.data, image_size=self.model.config.image_size))

    def loader(self, rank: int, world_size: int) -> tuple[Any, Any]:
        c = self.cfg
        return build_loader(c.data, c.mask, BatchSpec.of(self.model), c.train.seed, c.train.batch_size, rank,
                            world_size)

    def started(self, trainer: Trainer) -> None:
        if self.cfg.train.init and trainer.step == 0:  # a fresh run starting from other weights
            from multimae.checkpoint.pretrained import init_from

            report = init_from(self.model, self.cfg.train.init)
            if trainer.info.is_main:
                print("init: " + "\n".join(report.lines()), flush=True)

    def describe(self, trainer: Trainer) -> list[str]:
        return [f"run {trainer.run_dir}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, "
                f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} total, lr {trainer.lr:.3g}, "
                f"world size {trainer.info.world_size}"] + self._epoch_line() + self._coverage_line(trainer)

    def _coverage_line(self, trainer: Trainer) -> list[str]:
        line = coverage_line(trainer.loader.dataset)
        return [line] if line else []

    def _epoch_line(self) -> list[str]:
        d = self.cfg.data
        if d.source not in ("shards", "synthetic"):
            return []  # a folder / caption table: the epoch is the dataset
        return [f"epoch: {d.num_samples} samples ({self.epoch_note}; data.num_samples sets it)"]

    def checkpoint_meta(self, trainer: Trainer) -> dict[str, Any]:
        return {"model_config": config_lib.to_dict(self.model.config)}

    def log_stats(self, trainer: Trainer) -> dict[str, float]:
        return data_counts(trainer.loader.dataset)

    def after_step(self, trainer: Trainer, logger: RunLogger) -> None:
        t = self.cfg.train
        if t.vis_every and trainer.step % t.vis_every == 0 and trainer.info.is_main:
            self._log_figure(trainer, logger)

    def finish(self, trainer: Trainer, logger: RunLogger, evaluate: bool) -> None:
        counts = data_counts(trainer.loader.dataset)
        if not trainer.info.is_main:
            return
        if any(counts.values()):
            print(f"data: {counts['data/invalid_pixels']} invalid pixel(s) (NaN/inf) set to 0, "
                  f"{counts['data/skipped']} bad sample(s) skipped (metrics.jsonl: data/*)", flush=True)
        self._log_figure(trainer, logger)
        t = self.cfg.train
        if (evaluate and t.eval_at_end) or t.figure_at_end:
            from multimae.tasks.pretrain_report import finish_run

            self.result = finish_run(trainer, evaluate=evaluate and t.eval_at_end, figure=t.figure_at_end)

    def _log_figure(self, trainer: Trainer, logger: RunLogger) -> None:
        try:
            from multimae.evaluation.viz import reconstruction_figure
        except ImportError:  # pragma: no cover - viz is optional at import time
            return
        fig = reconstruction_figure(self.model, self.cfg, num_samples=2)
        if fig is not None:  # None: no held-out data (already said once)
            logger.log_image(trainer.step, "reconstruction", fig)


def completed_config(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with what it leaves open filled in (a copy): the vocabulary size of a text modality
    from the tokenizer, a raster modality's per-band mean / std from the folder's
    ``multimae_data.json`` (``multimae data stats``), the run name."""
    from multimae.core import modalities as M

    mods = dict(cfg.model.modalities)
    for name in sorted(set(cfg.model.inputs) | set(cfg.model.outputs)):
        spec = M.registered().get(name)
        over = mods.get(name, {})
        kind = over.get("kind", spec.kind if spec else None)
        if kind == "text" and "num_classes" not in over:
            mods[name] = {**over, "num_classes": load_text_tokenizer(cfg.data.tokenizer).get_vocab_size()}
    mods = _with_band_stats(cfg, mods)
    train = cfg.train if cfg.train.run_name else replace(cfg.train, run_name="pretrain")
    data = cfg.data
    if data.num_samples is None and data.source == "shards":  # the epoch is what they hold (a resume keeps it)
        data = replace(data, num_samples=epoch_samples(data)[0])
    return replace(cfg, model=replace(cfg.model, modalities=mods), train=train, data=data)


def _with_band_stats(cfg: PretrainConfig, mods: dict) -> dict:
    """Raster modalities without mean / std take them from a folder dataset's recorded statistics
    (then saved in the run's config and every checkpoint); other sources must set them."""
    from multimae.data.stats import fill_band_stats

    specs = replace(cfg.model, modalities=mods).specs(sorted(set(cfg.model.inputs) | set(cfg.model.outputs)))
    if not any(s.is_raster and s.mean is None for s in specs):
        return mods
    if cfg.data.source == "folder" and cfg.data.root:
        return fill_band_stats(cfg.data.root, mods, specs)
    names = [s.name for s in specs if s.is_raster and s.mean is None]
    logging.getLogger("multimae").warning(
        "raster modalities %s have no mean / std (data.source=%s has no multimae_data.json statistics): "
        "their raw values are not normalised; set model.modalities.<name>.mean / std", names, cfg.data.source)
    return mods


def pretrain(cfg: PretrainConfig, evaluate: bool = True) -> Path:
    """Train a MultiMAE as ``cfg`` says; returns the run directory (checkpoints, logs, config and,
    with ``evaluate``, ``eval.md`` and ``reconstruction.png``)."""
    return Trainer(PretrainTask(cfg)).fit(evaluate=evaluate)
