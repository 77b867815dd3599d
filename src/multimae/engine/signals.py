"""Stopping a run on a signal without losing work.

SIGTERM (``kill``, ``scancel``, torchrun passing its own on), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
``--signal=USR1@<seconds>`` warning) set a flag; the Trainer finishes the step it is in, every rank
agrees on the stop step (one 4-byte all-reduce on the CPU per step under torchrun, no device
synchronisation), saves a checkpoint and raises :class:`Preempted`; the CLI exits with
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). Re-running the same command continues
exactly. A second SIGINT or SIGTERM exits at once (the checkpoint being written is discarded;
the previous one stays).
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from multimae.engine import distributed as D

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the same command will continue
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing ``step``; run the same command to continue."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signame: str, step: int, checkpoint: Path | None) -> None:
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = f" (checkpoint {checkpoint})" if checkpoint else ""
        super().__init__(f"{signame}: stopped at step {step}, saved{where}; run the same command to continue "
                         f"(exit status {EXIT_PREEMPTED})")


class StopSignals:
    """Context manager: while active, the signals above set :attr:`signum` instead of killing the
    process (installed only in the main thread; elsewhere a no-op)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum in (signal.SIGINT, signal.SIGTERM):
            self.restore()  # the second one: now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if self.signum is None:
            self.signum = signum
            if self.announce:
                print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and exiting "
                      "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective under torchrun: every rank gets the same
        answer at the same step; a CPU all-reduce of one int, no device sync)."""
        if D.get_world_size() == 1:
            return self.signum is not None
        signum = D.all_reduce_max_int(self.signum or 0)
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)
