"""Parameter initialisation that gives a sharded parameter the values of the unsharded one.

A model whose ``reset_parameters`` fills every parameter through :func:`init_` can be built on the
meta device, sharded (FSDP2: each parameter becomes a DTensor holding 1/world of it) and then
initialised shard by shard with exactly the weights an unsharded build draws from the same RNG
state: each parameter is drawn whole into a temporary (one parameter at a time) and this rank keeps
its shard. Draws always come from the CPU generator, so a model materialised on a GPU gets the
weights of one built on the CPU and moved there. A meta tensor is left alone (no values, no draws).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["init_"]


@torch.no_grad()
def init_(p: Tensor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``fn(p, *args, **kwargs)`` in place (an ``nn.init`` function or one like it), for a
    parameter of any shape, always drawn from the CPU generator (as a model built on the CPU draws,
    wherever ``p`` lives). A DTensor ``p``: ``fn`` fills a full-size CPU temporary (the same draws
    as for the unsharded parameter) and ``p``'s local shard takes its part. A meta ``p`` is left
    alone."""
    sharded = False
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        sharded = isinstance(p, DTensor)
    if p.is_meta or (sharded and p.to_local().is_meta):
        return
    if not sharded and p.device.type == "cpu":
        fn(p, *args, **kwargs)
        return
    full = torch.empty(p.shape, dtype=p.dtype)
    fn(full, *args, **kwargs)
    if not sharded:
        p.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank cuts its own shard of its own (identical) full tensor, no communication
    p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
