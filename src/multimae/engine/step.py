"""One optimisation step as a plain function: ``train_step(model, batch, optimizer) -> dict``.

It knows nothing about modalities: the model returns its per-task losses, the step sums the
weighted total, scales for accumulation, clips, steps and reports. Mixed precision, DDP and
compile are applied outside (they wrap the model or set the ``precision`` argument).

The step does no host synchronisation: the losses, the gradient norm and the finite flag it
returns are tensors on the model's device (``lr`` is a Python float: it lives on the host). Read
them together with :func:`read_stats` (one device-to-host copy) when you need numbers, e.g. every
``train.log_every`` steps as the :class:`~multimae.engine.trainer.Trainer` does.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from multimae.core.batch import Batch
from multimae.core.device import autocast  # noqa: F401 (re-exported: the step and its callers use one helper)
from multimae.core.masking import MaskPlan

Micro = tuple[Batch, MaskPlan | None]
NonFinite = Literal["report", "raise", "skip"]
FINITE_KEY = "finite"  # the stats entry holding the step's device-side finite flag


class NonFiniteLossError(FloatingPointError):
    """A loss or the gradient norm became NaN or infinite; the message names the step and the
    task losses."""


def read_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """The step's stats as Python numbers, read in one device-to-host copy (a host sync).
    ``finite`` becomes 1.0 or 0.0."""
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    if keys:
        vals = torch.stack([stats[k].detach().reshape(()).float() for k in keys]).tolist()
        out.update(zip(keys, vals))
    return out


def nonfinite_message(step: int | None, values: Mapping[str, float]) -> str:
    """One line naming the step, what was not finite and every task loss (``values``: read stats)."""
    where = f" at step {step}" if step is not None else ""
    tasks = {k[len("loss/"):]: v for k, v in values.items() if k.startswith("loss/")}
    bad = {k: v for k, v in tasks.items() if not math.isfinite(v)}
    if bad or not math.isfinite(values.get("loss", 0.0)):
        what = f"non-finite loss{where}: {bad or {'total': values.get('loss')}}"
    else:
        what = f"non-finite gradient norm{where} ({values.get('grad_norm')})"
    return (f"{what} (all task losses: {tasks}). Lower the learning rate (optim.lr), enable gradient clipping "
            "(optim.clip_grad), or check the inputs for NaN/inf")


def train_step(model: nn.Module, batch: Batch | Mapping[str, Any] | Sequence[Micro], optimizer: torch.optim.Optimizer,
               plan: MaskPlan | None = None, *, scheduler: Any = None, precision: str = "fp32",
               scaler: "torch.amp.GradScaler | None" = None, clip_grad: float | None = None,
               step: int | None = None, no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
               nonfinite: NonFinite = "report") -> dict[str, Any]:
    """Forward, backward and one optimizer step, over one batch or a list of micro-batches.

    Args:
        batch: a Batch (with ``plan``; a plain mapping of tensors is read as one, :meth:`Batch.of`), or
            a list of ``(Batch, plan)`` micro-batches whose gradients are accumulated (each scaled by 1 / len).
        no_sync: DDP's ``model.no_sync`` to skip the all-reduce on all but the last micro-batch.
        nonfinite: what a NaN / infinite total loss or gradient norm does. ``"report"`` (default, no
            host sync): the update is applied and ``stats["finite"]`` says so on the device;
            ``"raise"``: NonFiniteLossError before the update; ``"skip"``: no update (the schedule
            still advances). ``raise`` and ``skip`` read the flag on the host (one sync per step).
    Returns: ``{"loss": total, "loss/<task>": ..., "n/<task>": ..., "grad_norm": ..., "finite": bool,
        "lr": float}``: 0-dim tensors on the model's device except ``lr`` (:func:`read_stats` reads
        them all at once). ``n/<task>``: the samples the task's loss covered in this step (summed
        over micro-batches; a model output's ``counts``, e.g. fewer than the batch when some
        samples lack the target).
    Raises: NonFiniteLossError naming the step and task losses (``nonfinite="raise"``).
    """
    micro: list[Micro] = [(Batch.of(batch), plan)] if isinstance(batch, Mapping) else list(batch)
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, Tensor] = {}
    covered: dict[str, Tensor] = {}  # samples each task's loss covered, summed over micro-batches
    total: Tensor | None = None
    for i, (b, p) in enumerate(micro):
        last = i == len(micro) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(precision, device):
                out = model(b, p)
            if out.loss is None:
                raise ValueError("the batch holds no target for any of the model's tasks")
            loss = out.loss / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        part = loss.detach().float()
        total = part if total is None else total + part
        for k, v in out.losses.items():
            v = v.detach().float() / len(micro)
            sums[k] = sums[k] + v if k in sums else v
        for k, n in getattr(out, "counts", {}).items():
            covered[k] = covered[k] + n if k in covered else n
    assert total is not None, "train_step needs at least one micro-batch"
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    else:  # measure only (clip_grad_norm_ with an infinite bound would also rescale every grad by 1)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; its value on every rank (a device collective)
        grad_norm = grad_norm.full_tensor()
    # fp16: the scaler skips steps with infinite gradients itself; only the loss counts then
    finite = torch.isfinite(total) if scaler is not None else torch.isfinite(total) & torch.isfinite(grad_norm)
    stats: dict[str, Any] = {"loss": total, "grad_norm": grad_norm.detach(), FINITE_KEY: finite}
    stats.update({f"loss/{k}": v for k, v in sums.items()})
    stats.update({f"n/{k}": v for k, v in covered.items()})  # beside loss/<task>: how many samples it covered
    update = True
    if nonfinite in ("raise", "skip") and not bool(finite):  # host sync, asked for
        if nonfinite == "raise":
            raise NonFiniteLossError(nonfinite_message(step, read_stats(stats)))
        update = False
    elif nonfinite not in ("report", "raise", "skip"):
        raise ValueError(f"nonfinite={nonfinite!r}: choose report, raise or skip")
    if update and scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif update:
        optimizer.step()
    stats["lr"] = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
    if scheduler is not None:
        scheduler.step()
    return stats
