"""The engine: one :class:`Trainer` that runs any :class:`Task` (pretraining, fine-tuning).

The Trainer owns what every run does the same way: the distributed set-up (torchrun + DDP),
seeding, the optimizer (AdamW, optional layer-wise lr decay) and its warm-up + cosine schedule,
exact resume (weights, optimizer, schedule, scaler, RNG and data position live in every
checkpoint), the batches (``accum_steps`` micro-batches per optimizer step, each epoch starting
where the step counter says), the one training loop and the checkpoints. A task owns what differs:
its model, the objective the step optimises, its loader, its evaluation and what its checkpoints
say about themselves. The loop never looks at modality names: it moves ``(Batch, plan)`` pairs
from the task's loader into :func:`multimae.engine.step.train_step`.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from multimae.core import config as config_lib
from multimae.checkpoint import (CheckpointError, find_latest, load_meta, resolve_checkpoint, restore_rng_state,
                                 save_checkpoint)
from multimae.engine import distributed as D
from multimae.engine import parallel as P
from multimae.engine.config import OptimConfig, RunConfig
from multimae.engine.identity import SCHEDULE_ONLY, acquire_lock, check_same_run, release_lock
from multimae.engine.logging import METRICS_FILE, Progress, RunLogger, WandbSettings
from multimae.engine.optim import WarmupCosine, build_optimizer, scaled_lr
from multimae.engine.signals import Preempted, StopSignals
from multimae.engine.state import drop_rows_after, load_train_state, train_state
from multimae.engine.step import FINITE_KEY, NonFiniteLossError, nonfinite_message, read_stats, train_step
from multimae.core.perf import tune_malloc


class Position(Protocol):
    """Where the loader is: ``len()`` batches per epoch and rank; ``set_epoch(epoch, start_batch)``."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


class Task:
    """What a task gives the :class:`Trainer`. ``cfg`` has ``train`` (a RunConfig) and ``optim``
    (an OptimConfig). ``build`` sets ``model`` (the module whose weights are optimised and saved)
    and ``objective`` (the module the step calls as ``objective(batch, plan)``, returning an output
    with ``loss`` and ``losses``); both are built on the CPU after the Trainer seeded the RNG."""

    cfg: Any
    model: nn.Module
    objective: nn.Module
    #: config keys besides :data:`multimae.engine.identity.SCHEDULE_ONLY` that may change when
    #: resuming a run of this task (``section.key``, or ``section.*``)
    schedule_only: frozenset[str] = frozenset()

    def build(self, device: torch.device, info: D.DistInfo) -> None:
        raise NotImplementedError

    def loader(self, rank: int, world_size: int) -> tuple[Iterable[Any], Position]:
        """The training loader of ``(Batch, plan)`` micro-batches and its position."""
        raise NotImplementedError

    def layer_ids(self) -> tuple[Callable[[str], int], int] | None:
        """``(param name -> layer id, number of layers)`` for ``optim.layer_decay``; None: the task's
        model has no layers to decay."""
        return None

    def started(self, trainer: "Trainer") -> None:
        """Called once the Trainer resumed or not (``trainer.step``): e.g. initialise a fresh run
        from other weights."""

    def describe(self, trainer: "Trainer") -> list[str]:
        """The lines printed when the run starts."""
        return []

    def checkpoint_meta(self, trainer: "Trainer") -> dict[str, Any]:
        """What a checkpoint says about itself besides the config and epoch."""
        return {}

    def log_stats(self, trainer: "Trainer") -> dict[str, float]:
        """Extra scalars logged with the step's (e.g. data counts)."""
        return {}

    def after_step(self, trainer: "Trainer", logger: RunLogger) -> None:
        """After every optimizer step, before its checkpoint (figures, periodic evaluation)."""

    def finish(self, trainer: "Trainer", logger: RunLogger, evaluate: bool) -> None:
        """After the last step of this invocation (final evaluation, figure, summary)."""


class Trainer:
    """Holds one run of ``task``; ``fit()`` trains until the schedule or ``train.max_steps`` ends
    and returns the run directory."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.info = D.init_distributed()
        t: RunConfig = task.cfg.train
        self.device = self.info.device if t.device == "auto" else torch.device(t.device)
        if t.tune_malloc:
            tune_malloc()
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        meta = P.builds_on_meta(task, t, self.info)  # FSDP: parameters on the meta device until sharded
        with P.parameters_on_meta(meta):
            task.build(self.device, self.info)
        # one writer per run: rank 0 holds the run directory's lock until fit() ends (or the process
        # does); then the checkpoint to resume, of this same run (before anything reads the data)
        self._lock = acquire_lock(self.run_dir) if self.info.is_main else None
        try:
            self._resume_from = self._checkpoint_to_resume()
        except BaseException:
            release_lock(self._lock)
            raise
        self.model = task.model if meta else task.model.to(self.device)
        # activation checkpointing and FSDP sharding, in place, before the optimizer is built (FSDP
        # replaces the parameters); a no-op for train.parallel=ddp without checkpointing
        P.prepare_model(self.model, t, self.info)
        if meta:  # each rank allocates and initialises its shards only: the weights of a DDP run
            P.materialise(self.model, self.device)
        self.loader, self.position = task.loader(self.info.rank, self.info.world_size)
        o: OptimConfig = self.cfg.optim
        self.steps_per_epoch = max(1, len(self.position) // o.accum_steps)
        self.total_steps = t.epochs * self.steps_per_epoch
        global_batch = t.batch_size * self.info.world_size * o.accum_steps
        self.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, global_batch)
        decay: dict[str, Any] = {}
        if o.layer_decay is not None:
            ids = task.layer_ids()
            if ids is None:
                raise config_lib.ConfigError("optim.layer_decay: this task does not decay the lr by layer (fine-tuning does); "
                                             "set optim.layer_decay=null")
            decay = dict(layer_decay=o.layer_decay, layer_id_fn=ids[0], num_layers=ids[1])
        self.optimizer = build_optimizer(self.model, lr=self.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                         implementation=o.implementation, no_decay_norm_bias=not o.decay_norm_bias,
                                         no_decay_names=sorted(self.model.no_weight_decay()), **decay)
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * self.steps_per_epoch)
        self.scheduler = WarmupCosine(self.optimizer, self.total_steps, min(warmup, self.total_steps), o.min_lr,
                                      warmup_start_lr=o.warmup_lr)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.step, self._rng_after_resume = 0, None
        if self._resume_from is not None:  # DDP: the checkpoint rank 0 saved; FSDP: its sharded/ part, through DCP
            self.step, self._rng_after_resume = P.restore(self._resume_from, self.model, self.optimizer,
                                                          self.scheduler, self.scaler)
            if self.info.is_main:
                print(f"resumed from {self._resume_from} at step {self.step}", flush=True)
        task.started(self)
        seed = D.rank_seed(t.seed, self.info.rank) + self.step
        torch.manual_seed(seed)  # drop path, mixup and masking noise per rank
        np.random.seed(seed % 2**32)
        self.net: nn.Module | None = self._build_net()  # the loop's module; fit releases it when it ends

    def _build_net(self) -> nn.Module:
        """The task's objective as the loop calls it: in DDP (several ranks), compiled (``train.compile``)."""
        t = self.cfg.train
        net = P.wrap(self.task.objective, t, self.info)
        if t.compile:
            net = torch.compile(net, backend=t.compile_backend, fullgraph=True)  # forward + loss whole
        return net

    def _release_net(self) -> None:
        """Drop the DDP wrapper as soon as the loop ends (normally or not). DDP holds the process group
        through reference cycles; left to the interpreter's last collection, gloo can tear its threads
        down in a dying process and abort it (``terminate called without an active exception``: about
        one exit in 20 of a bare 2-rank DDP worker here; not seen in 60 two-rank Trainer runs, where
        other references go first). Freed here, nothing of it is left for the exit."""
        if self.info.is_distributed and self.net is not None and self.net is not self.task.objective:
            self.net = None
            gc.collect()

    @property
    def cfg(self) -> Any:
        """The task's config (completed by the task when it built its model)."""
        return self.task.cfg

    @property
    def last_step(self) -> int:
        """The step this invocation of ``fit`` stops at: the schedule's end or ``train.max_steps``."""
        t = self.cfg.train
        return self.total_steps if t.max_steps is None else min(self.total_steps, t.max_steps)

    @property
    def run_dir(self) -> Path:
        t = self.cfg.train
        return Path(t.out_dir) / str(t.run_name)

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The resumable training state: optimizer, schedule, scaler, step and every RNG."""
        return train_state(self.optimizer, self.scheduler, self.scaler, self.step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the RNG when ``fit`` starts)."""
        self.step = load_train_state(state, self.optimizer, self.scheduler, self.scaler)
        self._rng_after_resume = state.get("rng")

    def _checkpoint_to_resume(self) -> Path | None:
        """``train.resume``: ``auto`` the run's latest checkpoint if the config defines the same run
        (a one-line error naming the keys otherwise), ``force`` the latest whatever the config, a
        path that checkpoint (same check), null none (a run directory with checkpoints refused)."""
        r = self.cfg.train.resume
        if not r:
            if find_latest(self.run_dir) is not None:
                raise CheckpointError(f"{self.run_dir} already holds checkpoints of another run; resume it "
                                      "(train.resume=auto), or pick another train.run_name")
            return None
        path = find_latest(self.run_dir) if r in ("auto", "force") else resolve_checkpoint(r)
        if path is not None and r != "force":
            check_same_run(load_meta(path).get("config"), config_lib.to_dict(self.cfg),
                           SCHEDULE_ONLY | self.task.schedule_only, path)
        return path

    def save(self) -> Path | None:
        """Checkpoint on rank 0 (all ranks hold the same weights under DDP); under FSDP every rank
        writes its shard (collective) and rank 0 the gathered full weights."""
        if not self.weights_finite():  # the last guard: never a checkpoint of NaN / inf weights
            latest = find_latest(self.run_dir)
            raise NonFiniteLossError(f"the weights at step {self.step} are not finite: not saved (latest checkpoint: "
                                     f"{latest or 'none'}). Lower the learning rate (optim.lr) or set optim.clip_grad")
        meta = {"config": config_lib.to_dict(self.cfg), "epoch": self.step // self.steps_per_epoch,
                **self.task.checkpoint_meta(self)}
        if P.is_sharded(self.model):
            return P.save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                  meta, self.cfg.train.keep_last)
        state = self.state_dict()
        if self.info.is_distributed:  # each rank's RNG (drop path, mixup draws differ per rank): collective
            state["rng_ranks"] = D.all_gather_object(state["rng"])
        if not self.info.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, meta, self.cfg.train.keep_last)

    def weights_finite(self) -> bool:
        """Every floating parameter and buffer is finite (one host read; collective under FSDP)."""
        tensors = [t.to_local() if hasattr(t, "to_local") else t
                   for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()]
        if not tensors:
            return True
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
        if P.is_sharded(self.model):  # each rank holds a shard
            ok = D.all_reduce_mean(ok)
        return bool(ok == 1.0)

    # ------------------------------------------------------------------ loop
    def batches(self):
        """Lists of ``accum_steps`` (Batch, plan) micro-batches on the device, from the current
        step on; each epoch starts where the step counter says (exact position after a resume)."""
        accum = self.cfg.optim.accum_steps
        while True:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            self.position.set_epoch(epoch, pos * accum)
            group = []
            for b, p in self.loader:
                group.append((b.to(self.device), p.to(self.device) if p is not None else None))
                if len(group) == accum:
                    yield group
                    group = []

    def fit(self, evaluate: bool = True) -> Path:
        """Train to the end of the schedule (or ``train.max_steps``); then the task's end of run
        (``evaluate``: its final evaluation when the schedule is complete).

        Raises: NonFiniteLossError (``train.nonfinite=stop``, or too many skips in a row) naming the
        step and the task losses; the weights of that step are never saved."""
        t = self.cfg.train
        last = self.last_step
        if self._rng_after_resume:
            restore_rng_state(self._rng_after_resume)
        logger = RunLogger(self.run_dir, enabled=self.info.is_main, purge_step=self.step + 1 if self.step else None,
                           loggers=t.loggers, wandb=WandbSettings(t.wandb_project, t.wandb_entity, t.run_name,
                                                                  config_lib.to_dict(self.cfg)))
        if self.info.is_main:
            config_lib.save_json(self.cfg, self.run_dir / "config.json")
            drop_rows_after(self.run_dir / METRICS_FILE, self.step)  # rows a killed run logged after its checkpoint
            for line in self.task.describe(self):
                print(line, flush=True)
        progress = Progress(last, initial=self.step, enabled=self.info.is_main, log_every=t.log_every)
        imgs_per_step = t.batch_size * self.info.world_size * self.cfg.optim.accum_steps
        if self.net is None:
            self.net = self._build_net()
        net = self.net
        no_sync = getattr(net, "no_sync", None)
        watch = NonFiniteWatch(t.nonfinite, t.nonfinite_max_skips)
        tic, window = time.perf_counter(), 0
        batches = self.batches()
        stop = StopSignals(announce=self.info.is_main).__enter__()
        saved: Path | None = None
        try:
            while self.step < last:
                stats = train_step(net, next(batches), self.optimizer, scheduler=self.scheduler,
                                   precision=t.precision, scaler=self.scaler, clip_grad=self.cfg.optim.clip_grad,
                                   step=self.step + 1, no_sync=no_sync, nonfinite=watch.step_mode)
                self.step += 1
                window += 1
                watch.track(self.step, stats)  # on the device (stop), or one host read (skip)
                preempted = stop.agreed()  # every rank stops at the same step (collective under torchrun)
                log = self.step % t.log_every == 0 or self.step == last
                ckpt = self.step % t.ckpt_every == 0 or self.step == last or preempted
                values = read_stats(stats) if (log or ckpt) else None  # the only host read of the step
                if values is not None:
                    watch.check()
                progress.update(1, loss=values["loss"] if log else None, lr=stats["lr"], imgs=imgs_per_step)
                if log:
                    self._log(logger, values, watch, imgs_per_step * window / max(time.perf_counter() - tic, 1e-9))
                    tic, window = time.perf_counter(), 0
                self.task.after_step(self, logger)
                if ckpt:
                    saved = self.save()
                if preempted:
                    raise Preempted(stop.name, self.step, saved)
        finally:
            net = no_sync = None
            self._release_net()
            stop.restore()
            progress.close()
            if sys.exc_info()[0] is not None:  # the run stops here (the process may go on)
                logger.close()
                release_lock(self._lock)
                self._lock = None
        if P.is_sharded(self.model):  # FSDP: rank 0 ends the run (figures, evaluation) on a plain copy
            self.model = self.task.model = P.unsharded_copy(self.model)  # (collective; no save() after this)
        self.task.finish(self, logger, evaluate)
        logger.close()
        D.barrier()
        release_lock(self._lock)
        self._lock = None
        return self.run_dir

    def _log(self, logger: RunLogger, values: dict[str, float], watch: "NonFiniteWatch", imgs_per_s: float) -> None:
        stats = {k: v for k, v in values.items() if k != FINITE_KEY}
        stats["imgs_per_s"] = imgs_per_s  # over the steps since the last log (a last step off the grid too)
        stats["epoch"] = self.step / self.steps_per_epoch
        if watch.mode == "skip":
            stats["skipped_steps"] = watch.skipped
        stats.update(self.task.log_stats(self))
        logger.log_scalars(self.step, stats)


class NonFiniteWatch:
    """``train.nonfinite``: ``stop`` keeps the first non-finite step and its values on the device
    (no host read) until :meth:`check` (a log or checkpoint step) raises naming them; ``skip`` lets
    the step skip the update (it reads the flag: one host sync per step) and raises after
    ``max_skips`` skipped steps in a row."""

    def __init__(self, mode: str, max_skips: int) -> None:
        self.mode, self.max_skips = mode, max_skips
        self.step_mode = "skip" if mode == "skip" else "report"
        self.skipped = self.in_a_row = 0
        self._first: Tensor | None = None  # step of the first non-finite update (0: none), on the device
        self._values: Tensor | None = None
        self._keys: list[str] = []

    def track(self, step: int, stats: dict[str, Any]) -> None:
        finite = stats[FINITE_KEY]
        if self.mode == "skip":
            if bool(finite):  # already read by the step
                self.in_a_row = 0
                return
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.max_skips:
                raise NonFiniteLossError(f"{self.in_a_row} non-finite steps in a row (train.nonfinite_max_skips="
                                         f"{self.max_skips}); the last: " + nonfinite_message(step, read_stats(stats)))
            return
        self._keys = [k for k, v in stats.items() if isinstance(v, Tensor) and k != FINITE_KEY]
        vals = torch.stack([stats[k].detach().reshape(()).float() for k in self._keys])
        if self._first is None:
            self._first = torch.zeros((), dtype=torch.long, device=vals.device)
            self._values = torch.zeros_like(vals)
        new = (self._first == 0) & ~finite
        self._first = torch.where(new, step, self._first)
        self._values = torch.where(new, vals, self._values)

    def check(self) -> None:
        """Raise NonFiniteLossError if a tracked step was not finite (reads the device flag)."""
        if self._first is None or self._values is None:
            return
        first = int(self._first)
        if first:
            values = dict(zip(self._keys, self._values.tolist()))
            raise NonFiniteLossError(nonfinite_message(first, values) + "; nothing of it was saved")
