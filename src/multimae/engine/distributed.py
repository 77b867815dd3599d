"""Distributed helpers: with :mod:`multimae.engine.parallel` (FSDP2, sharded checkpoints), the only
module of the library that imports ``torch.distributed``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and falls back to a single process when they are absent.
All helpers below also work (as no-ops) in a single, non-initialised process.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_dist",
    "is_main",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_reduce_mean",
    "broadcast_object",
    "wrap_ddp",
    "unwrap",
    "cleanup",
    "rank_seed",
    "all_reduce_max_int",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from e


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the process group from torchrun's environment, or describe a single process.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default nccl when CUDA is available, else gloo.
    Returns:
        ``DistInfo``; with no ``RANK``/``WORLD_SIZE`` in the environment, rank 0 of 1 on
        ``cuda:0`` (if available) or the CPU, without creating a process group.
    """
    if is_dist():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(local_rank))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, _device_for(0))
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {var} is not (launch with torchrun)")
    device = _device_for(local_rank)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, as a new floating tensor (same shape; input untouched)."""
    out = tensor.detach().clone() if tensor.is_floating_point() else tensor.detach().float()
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects; trusted peers only)."""
    if not is_dist() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_dist() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap an already-placed model in DDP when running with more than one process."""
    if not info.is_distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP and ``torch.compile`` wrappers to reach the user's module."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    """Destroy the process group if one exists. Drop every DDP module first (``del``): this collects
    their reference cycles, which otherwise the interpreter frees at exit, where gloo can abort the
    process (``terminate called without an active exception``)."""
    global _CPU_GROUP
    gc.collect()
    if is_dist():
        dist.destroy_process_group()
    _CPU_GROUP = None


def rank_seed(base_seed: int, rank: int) -> int:
    """A distinct, deterministic seed per rank, in ``[0, 2**32)`` (valid for numpy too)."""
    return (int(base_seed) + 1_000_003 * int(rank)) % (2**32)


_CPU_GROUP: Any = None


def all_reduce_max_int(value: int) -> int:
    """The largest ``value`` over all ranks, exchanged on the CPU (a gloo group beside NCCL): no
    device synchronisation. Collective; ``value`` itself without a process group."""
    global _CPU_GROUP
    if not is_dist() or get_world_size() == 1:
        return int(value)
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    return int(t.item())
