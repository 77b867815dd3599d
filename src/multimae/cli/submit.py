"""``multimae submit``: a pretraining or fine-tuning command as a SLURM job through submitit,
requeued on preemption and at the time limit until it finishes (:mod:`multimae.engine.slurm`).

    multimae submit --nodes 2 --gpus-per-node 8 --partition gpu --time 4320 -- \
        pretrain --config configs/pretrain/multimae-b-1600e.yaml train.parallel=fsdp
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from multimae.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "submit", run_submit,
                help="run pretrain / finetune as a SLURM job (submitit; requeued on preemption)",
                description="Submit `multimae pretrain ...` or `multimae finetune ...` to SLURM through "
                            "submitit: one process per GPU, torch.distributed set up from the job, SIGUSR1 "
                            "--signal-delay seconds before the time limit (the trainer saves and exits "
                            "resumable), then the job is requeued and resumes. Everything after `--` is the "
                            "command, exactly as you would run it.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="0: a CPU job (default 1)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the partition's)")
    p.add_argument("--time", type=int, default=24 * 60, dest="time_min", help="time limit in minutes (default 1440)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--signal-delay", type=int, default=120, dest="signal_delay_s",
                   help="seconds before the time limit that SIGUSR1 arrives (default 120)")
    p.add_argument("--max-timeouts", type=int, default=20, help="time-limit requeues before giving up (default 20)")
    p.add_argument("--name", default="multimae", help="job name")
    p.add_argument("--folder", default="runs/slurm", help="submitit's files and the job logs (default runs/slurm)")
    p.add_argument("--setup", action="append", default=[], help="a shell line run before the job (repeatable)")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor (no SLURM)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and return its status")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- pretrain|finetune ARGS ...")


TRAIN_COMMANDS = ("pretrain", "finetune")


class CommandJob:
    """What submitit runs in every task of the job: ``multimae <argv>`` with torch.distributed set
    up from the job; requeued after the trainer's resumable exit (picklable, checkpointable)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from multimae.cli.main import main
        from multimae.engine.slurm import EXIT_RESUMABLE, job_environment, on_resumable_exit

        env = job_environment()
        rc = main(self.argv)
        if rc == EXIT_RESUMABLE:
            print(f"multimae {' '.join(self.argv)}: stopped with a checkpoint (status {rc}); requeueing",
                  file=sys.stderr, flush=True)
            on_resumable_exit(env)
            return rc
        if rc:
            raise RuntimeError(f"multimae {' '.join(self.argv)} exited with status {rc}")
        return rc

    def checkpoint(self) -> Any:
        """What submitit requeues: the same command (the run resumes from its latest checkpoint)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(CommandJob(self.argv))


def submit_command(argv: Sequence[str], cfg: Any) -> Any:
    """Submit ``multimae <argv>`` (a pretrain or finetune command line) as a job of ``cfg`` (a
    :class:`multimae.engine.slurm.SlurmConfig`); returns the submitit job."""
    from multimae.engine.slurm import submit

    argv = list(argv)
    if not argv or argv[0] not in TRAIN_COMMANDS:
        raise ValueError(f"multimae submit runs a training command ({' or '.join(TRAIN_COMMANDS)} ...), "
                         f"got {' '.join(argv) or 'nothing'!r}")
    return submit(CommandJob(argv), cfg)


def run_submit(args: argparse.Namespace) -> int:
    from multimae.engine.slurm import SlurmConfig

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cfg = SlurmConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmConfig)})  # a flag each
    try:
        job = submit_command(command, cfg)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: multimae {' '.join(command)}\n  logs: {job.paths.stdout} / "
          f"{job.paths.stderr}", flush=True)
    if not args.wait:
        return 0
    try:
        job.result()
    except Exception as e:  # noqa: BLE001 - submitit re-raises the job's failure as its own types
        print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished", flush=True)
    return 0
