"""What makes a run directory one run: its identity (the resolved config that defines it) and its
one writer (an OS lock held by rank 0 for the run's life).

Resuming compares the config of the checkpoint it resumes with the config of this invocation.
Keys that only say how long, how often or how fast (:data:`SCHEDULE_ONLY`, plus what a task adds)
may change; any other difference (model, data, masking, objective, batch size, lr, seed, ...) is
another run: :class:`RunMismatchError` names the keys and the two ways out.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multimae.core.config import ConfigError

#: Keys (``section.key``; ``section.*`` for a whole section) that may differ between the
#: invocations of one run: its length, its intervals, the machine it runs on and its speed knobs.
SCHEDULE_ONLY = frozenset({
    "train.max_steps", "train.epochs", "train.log_every", "train.ckpt_every", "train.keep_last",
    "train.resume", "train.run_name", "train.out_dir", "train.device", "train.compile", "train.compile_backend",
    "train.tune_malloc", "train.activation_checkpointing", "train.parallel", "train.nonfinite",
    "train.nonfinite_max_skips", "train.init", "data.num_workers", "data.cache",
})
LOCK_FILE = ".lock"


class RunMismatchError(ConfigError):
    """Resuming a run directory with a config that defines another run."""


class RunLockedError(RuntimeError):
    """Another process writes this run directory."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples compare as lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and "." not in key:  # model.modalities={...}, mask.ratios={...}: one value each
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _allowed(key: str, schedule_only: Iterable[str]) -> bool:
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in schedule_only)


def check_same_run(saved: Mapping[str, Any] | None, now: Mapping[str, Any], schedule_only: Iterable[str],
                   checkpoint: Path) -> None:
    """Raise :class:`RunMismatchError` (one line) if ``now`` defines another run than ``saved``: a
    defining key whose values differ (keys only one side knows are a schema change, not a difference)."""
    if not isinstance(saved, Mapping):
        return  # a checkpoint without its config (written by hand): nothing to compare
    a, b = flatten(saved), flatten(now)
    keys = sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and not _allowed(k, schedule_only))
    if not keys:
        return
    shown = ", ".join(f"{k}: {_short(a[k])} -> {_short(b[k])}" for k in keys[:5])
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    raise RunMismatchError(
        f"{checkpoint} belongs to another run: {shown}{more}. Start a new run with train.run_name=<new name>, "
        "or resume it anyway with train.resume=force")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------ the run lock
_held: dict[str, list[Any]] = {}  # realpath -> [file, count]: one process may open its run again


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def acquire_lock(run_dir: Path, wait_for_orphans_s: float = 15.0) -> str:
    """Take the exclusive lock of ``run_dir`` (``run_dir/.lock``, ``fcntl.flock``) for this process;
    returns the key to :func:`release_lock`. The kernel drops it when the process ends, however it
    ends. Raises RunLockedError naming the PID that holds it. A lock held by the children of a dead
    process (data-loader workers outliving a killed rank) is waited for ``wait_for_orphans_s``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return key
    f = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
    deadline = time.monotonic() + wait_for_orphans_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            pid, _, host = f.read().strip().partition("@")
            gone = pid.isdigit() and host == socket.gethostname() and not _alive(int(pid))
            if not gone or time.monotonic() > deadline:
                f.close()
                who = f"process {pid} on {host}" if pid else "another process"
                raise RunLockedError(f"{run_dir} is being written by {who} (lock {run_dir / LOCK_FILE}); wait for it "
                                     "to end, or start another run with train.run_name=<new name>") from None
            time.sleep(0.5)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}@{socket.gethostname()}\n")
    f.flush()
    _held[key] = [f, 1]
    return key


def release_lock(key: str | None) -> None:
    """Drop one hold of :func:`acquire_lock`'s lock (the last one closes the file)."""
    entry = _held.get(key) if key else None
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        entry[0].close()
