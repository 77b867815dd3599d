"""The resumable training state shared by pretraining and fine-tuning: optimizer, schedule, gradient
scaler, step and RNG, saved beside the weights and restored from a checkpoint directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimae.checkpoint import capture_rng_state, load_checkpoint


def train_state(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, step: int) -> dict[str, Any]:
    """What ``state.pt`` holds: optimizer, schedule and scaler states, the step and every RNG."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step, "rng": capture_rng_state()}


def restore_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: Any) -> tuple[int, dict[str, Any] | None]:
    """Load a checkpoint's weights and training state in place; returns (step, RNG state to restore
    when the loop starts)."""
    weights, state, _meta = load_checkpoint(path)
    model.load_state_dict(weights)
    return load_train_state(state, optimizer, scheduler, scaler), rank_rng(state)


def load_train_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> int:
    """Restore :func:`train_state`'s optimizer, schedule and scaler states in place; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def rank_rng(state: dict[str, Any]) -> dict[str, Any] | None:
    """The RNG state this rank resumes with: its own when the checkpoint holds every rank's
    (``rng_ranks``, a DDP run of the same world size), else the saving rank's."""
    from multimae.engine import distributed as D

    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == D.get_world_size():
        return ranks[D.get_rank()]
    return state.get("rng")


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of a ``metrics.jsonl`` logged after ``step`` (a run killed after its last
    checkpoint logged them; the resumed run logs those steps again). Atomic; returns how many went."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):  # a line cut by the kill: drop it too
            dropped += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        from multimae.core.io import save_file_atomic

        save_file_atomic(path, lambda tmp: tmp.write_text("".join(keep), encoding="utf-8"))
    return dropped
