"""SLURM jobs through submitit (``multimae submit``): the normal ``pretrain`` / ``finetune``
command, one process per GPU, requeued after a preemption or at the time limit until it finishes.

How a job runs and comes back:

* ``sbatch`` gets ``--signal=USR1@<signal_delay_s>``: SLURM sends SIGUSR1 that many seconds before
  the time limit (and a preempting scheduler sends SIGTERM). submitit's preemption signal is set to
  USR1 too (``SUBMITIT_PREEMPT_SIGNAL``).
* Each task sets torch's distributed environment from submitit's ``JobEnvironment``
  (:func:`job_environment`: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR`` = the first node, ``MASTER_PORT`` from the job id) and runs the command line it
  was given (the CLI's job, ``multimae.cli.submit.CommandJob``: the library never calls up into
  the CLI).
* The trainer's contract: on SIGUSR1 / SIGTERM it saves a checkpoint at the current step and exits
  with the resumable status :data:`EXIT_RESUMABLE`; the same command resumes it bitwise
  (``train.resume=auto``). Rank 0 then hands the signal to submitit (:func:`on_resumable_exit`),
  which calls the job's ``checkpoint()`` (``multimae.cli.submit.CommandJob``: the same command
  again) and requeues the job (``scontrol requeue``; the local executor restarts it). A signal that arrives while no trainer is
  running (start-up) goes to submitit directly: requeued from the last checkpoint.
* Any other non-zero status fails the job (no requeue). submitit stops requeuing after
  ``max_timeouts`` time-limit requeues; preemptions do not count.

The job's logs and submitit's files go to ``folder/<job id>_*``.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

from multimae.engine.signals import EXIT_PREEMPTED

__all__ = ["EXIT_RESUMABLE", "PREEMPT_SIGNAL", "SlurmConfig", "distributed_env", "job_environment",
           "on_resumable_exit", "submit"]

EXIT_RESUMABLE = EXIT_PREEMPTED  # the trainer's exit status after a signal (checkpoint saved: run it again)
PREEMPT_SIGNAL = "USR1"


@dataclass
class SlurmConfig:
    """Resources and requeue policy of a job (``multimae submit`` options)."""

    nodes: int = 1
    gpus_per_node: int = 1  # 0: a CPU job
    tasks_per_node: int | None = None  # processes per node; None: one per GPU (one on a CPU job)
    cpus_per_task: int = 8
    mem_gb: float | None = None
    time_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # SIGUSR1 this long before the time limit: time to finish a step and save
    max_timeouts: int = 20  # time-limit requeues before submitit gives up
    name: str = "multimae"
    folder: str = "runs/slurm"
    local: bool = False  # submitit's LocalExecutor: run here (tests, a dry run without SLURM)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def distributed_env(env: Any) -> dict[str, str]:
    """torch.distributed's environment variables of one task of a submitit job (``env``: its
    ``submitit.JobEnvironment``); empty for a single-task job (no process group)."""
    if env.num_tasks <= 1:
        return {}
    job = "".join(c for c in str(env.job_id) if c.isdigit()) or "0"
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)), "MASTER_ADDR": env.hostnames[0],
            "MASTER_PORT": str(20000 + int(job) % 20000)}


def _import_submitit() -> Any:
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", PREEMPT_SIGNAL)  # read by submitit at import (and by the job)
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError("multimae submit needs submitit: pip install 'multimae[slurm]'") from e
    from submitit.core.job_environment import JobEnvironment

    JobEnvironment.USR_SIG = PREEMPT_SIGNAL  # also when submitit was imported before the variable was set
    return submitit


def on_resumable_exit(env: Any) -> None:
    """After the trainer stopped with :data:`EXIT_RESUMABLE`: on the job's rank 0, hand the
    preemption signal to submitit, whose handler calls the job's ``checkpoint()`` (the same command
    again), requeues the job and exits; other ranks return."""
    if env.global_rank == 0:
        signal.raise_signal(getattr(signal, f"SIG{PREEMPT_SIGNAL}"))


def job_environment() -> Any:
    """submitit's ``JobEnvironment`` of the running task, with torch.distributed's variables set
    from it (:func:`distributed_env`)."""
    env = _import_submitit().JobEnvironment()
    os.environ.update(distributed_env(env))
    return env


def _executor(cfg: SlurmConfig) -> Any:
    submitit = _import_submitit()
    executor = submitit.AutoExecutor(folder=os.path.join(cfg.folder, "%j"), cluster="local" if cfg.local else "slurm",
                                     slurm_max_num_timeout=cfg.max_timeouts)
    params: dict[str, Any] = dict(name=cfg.name, nodes=cfg.nodes, tasks_per_node=cfg.tasks, timeout_min=cfg.time_min,
                                  gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task,
                                  slurm_signal_delay_s=cfg.signal_delay_s)
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key) is not None:
            params[f"slurm_{key}"] = getattr(cfg, key)
    if cfg.setup:
        params["slurm_setup"] = list(cfg.setup)
    executor.update_parameters(**params)
    return executor


def submit(job: Any, cfg: SlurmConfig) -> Any:
    """Submit ``job`` (a picklable callable; with a ``checkpoint()`` method returning a
    ``submitit.helpers.DelayedSubmission`` it is requeued) as a job of ``cfg``; returns the submitit
    job (``.job_id``, ``.paths``, ``.result()``)."""
    if cfg.nodes < 1 or cfg.tasks < 1 or cfg.gpus_per_node < 0:
        raise ValueError(f"multimae submit: nodes={cfg.nodes}, tasks per node={cfg.tasks}, "
                         f"gpus per node={cfg.gpus_per_node}: need at least one node and task, no negative GPUs")
    return _executor(cfg).submit(job)
