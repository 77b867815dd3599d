"""Linear probing (MAE / M3AE protocol): a frozen encoder, features computed once and cached,
BatchNorm without affine parameters + a linear layer trained on them; top-1 on ``data.eval_split``.

The features are the mean of all final encoder tokens (:meth:`TransferModel.features`) of the
evaluation-transformed images (no augmentation), so one pass over each split is all the encoder
work. The classifier trains with AdamW under a warm-up + cosine schedule (the papers use LARS at
batch 16k; at these sizes AdamW reaches the same optimum in seconds). The run directory holds the
config, ``metrics.jsonl``, TensorBoard, one checkpoint (encoder + probe weights) and ``eval.md``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.core import config as config_lib
from multimae.checkpoint import find_latest, load_meta, save_checkpoint
from multimae.engine.identity import SCHEDULE_ONLY, acquire_lock, check_same_run, release_lock
from multimae.engine.signals import Preempted, StopSignals
from multimae.evaluation.protocols import top1_top5
from multimae.data.transfer import TARGET
from multimae.tasks.transfer import Datasets, default_run_name, prepare
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.engine.logging import Progress, RunLogger
from multimae.engine.optim import WarmupCosine
from multimae.checkpoint.convert import ConversionReport
from multimae.model.heads.probe import LinearProbe
from multimae.model.transfer import TransferModel
from multimae.runs import PROBE_PREFIX, ProbeModel

#: what may change between two invocations of one probe run: besides the schedule, what a probe
#: does not read (the fine-tuning optimizer, augmentation and loss) and the evaluated split
PROBE_SCHEDULE_ONLY = SCHEDULE_ONLY | {"optim.*", "aug.*", "train.batch_size", "train.precision", "train.loss",
                                       "train.eval_every", "train.eval_batch_size", "data.eval_split",
                                       "data.eval_transform", "data.eval_crop_pct", "data.val_samples",
                                       "data.test_samples"}


@torch.no_grad()
def extract_features(model: TransferModel, loader: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """(N, D) float32 features and (N,) labels of every sample of ``loader``, in order."""
    model.eval()
    feats, labels = [], []
    keys = [s.key for s in model.input_specs.values()]
    for batch in loader:
        feats.append(model.features(batch.select(keys).to(device)).float().cpu())
        labels.append(batch[TARGET])
    return torch.cat(feats), torch.cat(labels)


def train_probe(train_x: Tensor, train_y: Tensor, num_classes: int, epochs: int, batch_size: int, lr: float,
                weight_decay: float, seed: int = 0, progress: Progress | None = None,
                logger: RunLogger | None = None, stop: StopSignals | None = None) -> LinearProbe:
    """Fit a :class:`LinearProbe` on cached features (N, D) / labels (N,), full epochs of
    shuffled mini-batches (the last partial one included). ``stop``: a signal ends the fit after
    the epoch it arrived in (:class:`Preempted`; a probe has no intermediate checkpoint: running the
    same command again fits it from the start, in seconds)."""
    torch.manual_seed(seed)
    probe = LinearProbe(train_x.shape[1], num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = probe_steps(len(train_x), batch_size)
    sched = WarmupCosine(opt, epochs * steps_per_epoch, min(steps_per_epoch, epochs * steps_per_epoch))
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        probe.train()
        perm = torch.randperm(len(train_x), generator=g)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            if progress is not None:  # one optimizer step (the bar counts steps, not epochs)
                progress.update(1, loss=float(loss.detach()), lr=sched.get_last_lr()[0], imgs=len(idx))
        if logger is not None:
            logger.log_scalars(step, {"loss": total / len(perm), "epoch": epoch + 1})
        if stop is not None and stop.signum is not None and epoch + 1 < epochs:
            raise Preempted(stop.name, step, None)
    return probe.eval()


def probe_steps(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch of :func:`train_probe` on ``n`` samples (a last batch of one
    sample is left out: BatchNorm needs two)."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


@dataclass
class ProbeFeatures:
    """A frozen encoder built from ``cfg.init`` and its cached features of the training split and
    of ``cfg.data.eval_split`` (what a linear probe trains and is scored on)."""

    model: TransferModel
    report: ConversionReport
    cfg: FinetuneConfig  # completed by :func:`~multimae.tasks.finetune.prepare`
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    seconds: float  # feature extraction time


def probe_features(cfg: FinetuneConfig, datasets: Datasets | None = None) -> ProbeFeatures:
    """Build the frozen encoder (seeded by ``train.seed``) and extract both splits' features once."""
    from multimae.tasks.finetune_data import build_eval_loader

    torch.manual_seed(cfg.train.seed)
    model, report, cfg = prepare(cfg)
    device = torch.device("cpu") if cfg.train.device in ("auto", "cpu") else torch.device(cfg.train.device)
    model.to(device).requires_grad_(False)
    specs = list(model.input_specs.values())
    tic = time.perf_counter()
    train_x, train_y = extract_features(model, build_eval_loader(cfg, specs, train_split_stats=True,
                                                                 datasets=datasets), device)
    eval_x, eval_y = extract_features(model, build_eval_loader(cfg, specs, datasets=datasets), device)
    return ProbeFeatures(model, report, cfg, train_x, train_y, eval_x, eval_y, time.perf_counter() - tic)


def run_probe(cfg: FinetuneConfig, datasets: Datasets | None = None) -> tuple[Path, dict[str, Any]]:
    """Linear-probe ``cfg.init`` on ``cfg.data`` (classification); returns the run directory and
    the evaluation result (metrics, baseline)."""
    if cfg.model.head.kind != "classification":
        raise ValueError(f"a linear probe classifies: model.head.kind must be classification, not {cfg.model.head.kind}")
    if not cfg.train.run_name:
        cfg = replace(cfg, train=replace(cfg.train, run_name=default_run_name(cfg, prefix="probe")))
    lock = acquire_lock(Path(cfg.train.out_dir) / str(cfg.train.run_name))  # one writer per run
    try:
        return _run_probe(cfg, datasets)
    finally:
        release_lock(lock)


def _run_probe(cfg: FinetuneConfig, datasets: Datasets | None) -> tuple[Path, dict[str, Any]]:
    from multimae.tasks.finetune_eval import class_baseline, write_eval_report

    f = probe_features(cfg, datasets)
    model, report, cfg = f.model, f.report, f.cfg
    train_x, train_y, eval_x, eval_y, t_feat = f.train_x, f.train_y, f.eval_x, f.eval_y, f.seconds
    run_dir = Path(cfg.train.out_dir) / str(cfg.train.run_name)
    K = int(cfg.model.head.num_classes or 0)
    p = cfg.probe
    latest = find_latest(run_dir)
    if latest is not None and cfg.train.resume != "force":  # the same probe only: it is fitted again
        check_same_run(load_meta(latest).get("config"), config_lib.to_dict(cfg), PROBE_SCHEDULE_ONLY, latest)
    config_lib.save_json(cfg, run_dir / "config.json")
    print(f"probe {run_dir}: {report.init_summary()}; features {tuple(train_x.shape)} train, {tuple(eval_x.shape)} "
          f"{cfg.data.eval_split} in {t_feat:.1f}s", flush=True)
    with RunLogger(run_dir) as logger:
        steps = p.epochs * probe_steps(len(train_x), p.batch_size)
        progress = Progress(steps, log_every=max(1, steps // 5))
        tic = time.perf_counter()
        with StopSignals() as stop:
            probe = train_probe(train_x, train_y, K, p.epochs, p.batch_size, p.lr, p.weight_decay, cfg.train.seed,
                                progress, logger, stop)
        progress.close()
        t_fit = time.perf_counter() - tic
        metrics = top1_top5(probe, eval_x, eval_y, K)
        logger.log_scalars(steps, {f"eval/{k}": v for k, v in metrics.items()})
    weights = {**model.state_dict(), **{PROBE_PREFIX + k: v for k, v in probe.state_dict().items()}}
    save_checkpoint(run_dir, steps, weights, {"step": steps}, {"config": config_lib.to_dict(cfg), "kind": "probe",
                                                              "task": "label", "init_report": report.init_summary()})
    base = class_baseline(train_y, eval_y, K)
    res = {"metrics": metrics, "baseline": base, "num_samples": len(eval_y), "split": cfg.data.eval_split,
           "time": {"features_s": round(t_feat, 2), "fit_s": round(t_fit, 2)}}
    write_eval_report(res, cfg, run_dir, steps, report.init_summary(), protocol="linear probe")
    return run_dir, res


def evaluate_probe(model: ProbeModel, cfg: FinetuneConfig, device: str | torch.device) -> dict[str, Any]:
    """Score a saved probe run's model (:func:`multimae.runs.load_run`) on ``cfg.data.eval_split``."""
    from multimae.tasks.finetune_data import build_eval_loader
    from multimae.tasks.finetune_eval import class_baseline

    K = int(cfg.model.head.num_classes or 0)
    specs = list(model.input_specs.values())
    x, y = extract_features(model, build_eval_loader(cfg, specs), torch.device(device))
    train_y = torch.cat([b[TARGET] for b in build_eval_loader(cfg, specs, train_split_stats=True)])
    return {"metrics": top1_top5(model.probe, x, y, K), "baseline": class_baseline(train_y, y, K),
            "num_samples": len(y), "split": cfg.data.eval_split}
