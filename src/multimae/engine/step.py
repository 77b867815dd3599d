"""One optimisation step as a plain function: ``train_step(model, batch, optimizer) -> dict``.

It knows nothing about modalities: the model returns its per-task losses, the step sums the
weighted total, scales for accumulation, clips, steps and reports. Mixed precision, DDP and
compile are applied outside (they wrap the model or set the ``precision`` argument).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from multimae.batch import Batch
from multimae.masking import MaskPlan

Micro = tuple[Batch, MaskPlan | None]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the tasks and the step."""


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast context for ``fp32`` (none), ``bf16`` (CPU or GPU) or ``fp16`` (GPU only)."""
    dev = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    if precision == "fp16":
        if dev != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (use bf16 on the CPU)")
        return torch.autocast(dev, dtype=torch.float16)
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")


def _check_finite(losses: dict[str, Tensor], step: int | None) -> None:
    vals = {k: float(v.detach()) for k, v in losses.items()}
    bad = {k: v for k, v in vals.items() if not torch.isfinite(torch.tensor(v))}
    if bad:
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteLossError(
            f"non-finite loss{where}: {bad} (all task losses: {vals}). Lower the learning rate, "
            "enable gradient clipping (optim.clip_grad), or check the inputs for NaN/inf.")


def train_step(model: nn.Module, batch: Batch | Mapping[str, Any] | Sequence[Micro], optimizer: torch.optim.Optimizer,
               plan: MaskPlan | None = None, *, scheduler: Any = None, precision: str = "fp32",
               scaler: "torch.amp.GradScaler | None" = None, clip_grad: float | None = None,
               step: int | None = None, no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
               ) -> dict[str, float]:
    """Forward, backward and one optimizer step, over one batch or a list of micro-batches.

    Args:
        batch: a Batch (with ``plan``; a plain mapping of tensors is read as one, :meth:`Batch.of`), or
            a list of ``(Batch, plan)`` micro-batches whose gradients are accumulated (each scaled by 1 / len).
        no_sync: DDP's ``model.no_sync`` to skip the all-reduce on all but the last micro-batch.
    Returns: ``{"loss": total, "loss/<task>": ..., "grad_norm": ..., "lr": ...}`` (floats).
    Raises: NonFiniteLossError naming the step and task losses.
    """
    micro: list[Micro] = [(Batch.of(batch), plan)] if isinstance(batch, Mapping) else list(batch)
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    total = 0.0
    for i, (b, p) in enumerate(micro):
        last = i == len(micro) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(precision, device):
                out = model(b, p)
            if out.loss is None:
                raise ValueError("the batch holds no target for any of the model's tasks")
            _check_finite(out.losses, step)
            loss = out.loss / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(out.loss.detach()) / len(micro)
        for k, v in out.losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    else:  # measure only (clip_grad_norm_ with an infinite bound would also rescale every grad by 1)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
    if scheduler is not None:
        scheduler.step()
    stats = {"loss": total, "grad_norm": float(grad_norm), "lr": lr}
    stats.update({f"loss/{k}": v for k, v in sums.items()})
    return stats
