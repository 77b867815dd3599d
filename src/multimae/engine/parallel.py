"""Scale-out of a training run: DDP or FSDP2, activation checkpointing, sharded checkpoints.

``train.parallel``:

* ``"ddp"`` (default): every rank holds the whole model, gradients are all-reduced
  (:func:`multimae.engine.distributed.wrap_ddp`); rank 0 writes the usual checkpoint. Unchanged.
* ``"fsdp"``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every transformer block
  (:class:`multimae.model.layers.attention.Block`: encoder and decoder blocks), on every input and
  output adapter (what is left of them outside their blocks) and on the root, so each rank keeps
  1/world of the parameters, gradients and AdamW moments and gathers one unit at a time. ``train.precision=bf16`` gives a bf16 parameter / gradient-reduction dtype (fp32 master
  weights stay sharded); otherwise everything is fp32. Output adapters named in
  ``model.fp32_outputs`` keep fp32 parameters under bf16.

Start-up under ``fsdp`` (pretraining; torchtitan's order): the model is built with its parameters
on the meta device (:func:`parameters_on_meta`: no memory; buffers such as position tables are
computed as usual), sharded, then materialised shard by shard (:func:`materialise`: ``to_empty``
allocates each rank's shards, the model's ``reset_parameters`` draws every parameter whole into a
temporary from the RNG state the model was built under and keeps this rank's shard), so no rank
ever holds the whole model and the initial weights are exactly those of a DDP run of the same seed.
A task opts in with ``meta_init = True`` (fine-tuning loads its init before sharding: it does not).

``train.activation_checkpointing=true`` recomputes each block's activations in the backward pass
instead of storing them (torch's composable, non-reentrant ``checkpoint``: module names and
therefore state-dict keys, optimizer groups and layer-wise lr decay do not change; the RNG is
replayed, so drop path draws the same mask twice). It works with either mode and in one process.

Checkpoints of an FSDP run are the usual directory (:mod:`multimae.checkpoint.io`) plus
``sharded/``, written by every rank through ``torch.distributed.checkpoint`` (DCP)::

    step-000001234/
        model.safetensors   full weights, gathered on rank 0 (what convert / predict / evaluate /
                            from_pretrained read: an FSDP run exports exactly like a DDP run)
        state.pt            scheduler, scaler, step, rank 0's RNG; "optimizer" is empty
        sharded/            DCP: model + optimizer, sharded (get_state_dict / set_state_dict),
                            plus rng-rank<r>.pt (each rank's RNG)
        meta.json           ..., "parallel": "fsdp"

Every rank stages ``sharded/`` beside the checkpoints; rank 0 moves it into the temporary
checkpoint directory before ``meta.json`` is written and renames that into place, so the
checkpoint appears whole or not at all (a crash leaves a stale staging directory, removed by the
next save). All ranks must see the same file system. Resuming reads ``sharded/`` with DCP, which
also re-shards: a run may resume on another number of ranks, or under ``ddp``; the shards of a
format-1 fine-tuning checkpoint (the encoder under its old names) are read under those names
(:func:`multimae.checkpoint.io.transfer_name`).
"""
from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimae.engine import distributed as D
from multimae.checkpoint import CheckpointError, capture_rng_state, read_train_state, save_checkpoint, step_dir_name
from multimae.checkpoint.io import transfer_name
from multimae.core.io import fsync_file

__all__ = [
    "PARALLEL_MODES",
    "SHARDED_DIR",
    "transformer_blocks",
    "apply_activation_checkpointing",
    "mixed_precision_policy",
    "prepare_model",
    "builds_on_meta",
    "parameters_on_meta",
    "materialise",
    "wrap",
    "is_sharded",
    "is_sharded_checkpoint",
    "full_state_dict",
    "save_sharded",
    "restore_sharded",
    "restore",
    "unsharded_copy",
]

PARALLEL_MODES = ("ddp", "fsdp")
SHARDED_DIR = "sharded"
_STAGING_PREFIX = ".tmp-sharded-"  # ".tmp-": removed as stale by the checkpoint writer's cleanup


# ------------------------------------------------------------------------------------------ model
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of ``model`` (encoder and decoder blocks), in module order."""
    from multimae.model.layers.attention import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` in place (non-reentrant; names unchanged).
    Returns the number of blocks."""
    from torch.distributed._composable import checkpoint

    blocks = transformer_blocks(model)
    for blk in blocks:
        checkpoint(blk)  # use_reentrant=False and preserve_rng_state=True are its defaults
    return len(blocks)


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2 policy of ``train.precision``: bf16 parameters and gradient reduction for ``bf16``,
    fp32 otherwise (``fp16`` autocast then still computes in fp16 on the GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def _fp32_subtrees(model: nn.Module) -> list[nn.Module]:
    """Output adapters the model runs in fp32 under autocast (``model.fp32_outputs``)."""
    names = getattr(getattr(model, "config", None), "fp32_outputs", None) or []
    adapters = getattr(model, "output_adapters", None)
    return [adapters[n] for n in names if adapters is not None and n in adapters]


def _check(parallel: str, train: Any) -> None:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel={parallel!r}: expected one of {', '.join(PARALLEL_MODES)}")
    if parallel == "fsdp":
        if getattr(train, "init", None):
            raise ValueError("train.init with train.parallel=fsdp is not supported: start the run from those weights "
                             "with train.parallel=ddp, or fine-tune (its init is loaded before sharding)")
        if getattr(train, "vis_every", 0):
            raise ValueError("train.vis_every > 0 with train.parallel=fsdp is not supported (the figure is drawn on "
                             "rank 0 alone); set train.vis_every=0 (the figure at the end is still drawn)")


def prepare_model(model: nn.Module, train: Any, info: D.DistInfo) -> nn.Module:
    """Apply activation checkpointing and, under ``fsdp`` with more than one process, FSDP2 to
    ``model`` in place. Call it before the optimizer is built (FSDP replaces the parameters by
    sharded DTensors of the same names). Returns ``model``.

    ``train`` is the run's train config (``parallel``, ``activation_checkpointing``,
    ``precision``, ``init``, ``vis_every``).
    """
    parallel = getattr(train, "parallel", "ddp")
    _check(parallel, train)
    shard = parallel == "fsdp" and info.is_distributed
    if shard:  # a plain copy on the meta device (no memory): what unsharded_copy() fills with full weights
        model._multimae_skeleton = [_meta_skeleton(model)]  # a list: not registered as a submodule
    if getattr(train, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    if not shard:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _return_large_frees()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy, fp32 = mixed_precision_policy(train.precision), mixed_precision_policy("fp32")
    in_fp32 = {id(m) for sub in _fp32_subtrees(model) for m in sub.modules()}
    for blk in transformer_blocks(model):  # bottom-up: the blocks, the adapters, the root
        fully_shard(blk, mesh=mesh, mp_policy=fp32 if id(blk) in in_fp32 else policy)
    for sub in _adapters(model):
        fully_shard(sub, mesh=mesh, mp_policy=fp32 if id(sub) in in_fp32 else policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _adapters(model: nn.Module) -> list[nn.Module]:
    """Each input and output adapter (and a shared decoder) of ``model`` that has parameters outside
    its transformer blocks: sharded as units of their own, so that their whole parameters are
    gathered only while they run and their gradients are reduced as soon as their backward ends.
    Left in the root unit, they would stay gathered from the start of the forward pass to the end
    of the backward pass, and their full gradients would wait for the root's reduction at the end
    of the backward pass, where the per-rank peak is."""
    in_blocks = {id(p) for blk in transformer_blocks(model) for p in blk.parameters()}
    subs: list[nn.Module] = []
    for name in ("input_adapters", "output_adapters"):
        group = getattr(model, name, None)
        subs += list(group.values()) if isinstance(group, nn.ModuleDict) else []
    shared = getattr(model, "shared_decoder", None)
    subs += [shared] if isinstance(shared, nn.Module) else []
    return [m for m in subs if any(id(p) not in in_blocks for p in m.parameters())]


def builds_on_meta(task: Any, train: Any, info: D.DistInfo) -> bool:
    """True when the Trainer builds ``task``'s model on the meta device: ``fsdp`` over several
    processes, a task that opts in (``meta_init``), no ``train.init``."""
    return (getattr(train, "parallel", "ddp") == "fsdp" and info.is_distributed and bool(getattr(task, "meta_init", False))
            and not getattr(train, "init", None))


@contextlib.contextmanager
def parameters_on_meta(enabled: bool = True) -> Iterator[None]:
    """Within it, every parameter a module registers is moved to the meta device as it is
    registered (one parameter's memory at a time, freed at once); buffers stay where they were
    computed. Not thread-safe (it patches ``nn.Module.register_parameter``)."""
    if not enabled:
        yield
        return
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device) -> nn.Module:
    """Give the meta parameters of ``model`` (sharded by :func:`prepare_model` or not) memory on
    ``device`` and their initial values: ``model.reset_parameters()`` run from
    ``model.init_rng_state`` (the RNG state it was built under), which fills every parameter
    whole and keeps this rank's shard (:func:`multimae.model.layers.init.init_`). The global RNG is left
    as it was. A parameter that ``reset_parameters`` leaves alone is an error (it is NaN-filled
    first, so it cannot pass unnoticed). Returns ``model``."""
    reset, state = getattr(model, "reset_parameters", None), getattr(model, "init_rng_state", None)
    if reset is None or state is None:
        raise TypeError(f"{type(model).__name__} cannot be built on the meta device: it needs reset_parameters() "
                        "and init_rng_state (as multimae.model.multimae.MultiMAE has)")
    buffers = dict(model.named_buffers())  # computed at build time; to_empty would drop their values
    model.to_empty(device=device)
    for name, b in buffers.items():
        model.get_buffer(name).copy_(b)
    params = dict(model.named_parameters())
    for p in params.values():
        _local(p).fill_(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(state)
        reset()
    missed = [n for n, p in params.items() if _local(p).isnan().any()]
    if missed:
        raise RuntimeError(f"{type(model).__name__}.reset_parameters() does not initialise {missed[:5]}: "
                           "it cannot be built on the meta device")
    return model


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# glibc mallopt parameters and the values restored under FSDP (glibc's defaults, made fixed)
_MALLOPT = ((-3, 128 << 10, "MALLOC_MMAP_THRESHOLD_"), (-1, 128 << 10, "MALLOC_TRIM_THRESHOLD_"),
            (-2, 128 << 10, "MALLOC_TOP_PAD_"))


def _return_large_frees() -> None:
    """Under FSDP on the CPU, give large freed blocks back to the kernel at once (glibc: a fixed
    128 KiB mmap threshold; it overrides ``train.tune_malloc``; a MALLOC_*_ variable the user set
    wins). FSDP allocates and frees each block's gathered parameters and gradients several times
    a step; kept in glibc's heap (tune_malloc, or glibc's default dynamic threshold, which rises to
    the largest freed size) they fragment it and the resident set grows to several times the
    shards: ViT-B, 2 ranks, measured peak 2.7 GiB per rank with them kept vs 1.8 GiB returned,
    against 2.75 GiB for DDP (benchmarks/fsdp_memory.py). The cost is page faults on re-allocation."""
    import os

    from multimae.core.perf import _glibc

    mallopt = _glibc("mallopt")
    if mallopt is None:
        return
    import ctypes

    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for param, value, env in _MALLOPT:
        if env not in os.environ:
            mallopt(param, value)


def wrap(model: nn.Module, train: Any, info: D.DistInfo) -> nn.Module:
    """The module the loop calls: DDP around ``model`` under ``ddp`` with more than one process,
    ``model`` itself otherwise (an FSDP model is already sharded by :func:`prepare_model`)."""
    if getattr(train, "parallel", "ddp") == "ddp" and info.is_distributed:
        return D.wrap_ddp(model, info)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model :func:`prepare_model` sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(D.unwrap(model), FSDPModule)


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers live on the meta device
    (non-persistent buffers, which no state dict carries, are copied)."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------------ state
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict, with the names of ``model.state_dict()`` of the plain
    model. Collective under FSDP: every rank calls it, rank 0 gets the tensors, others ``{}``."""
    if not is_sharded(model):
        return D.unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(D.unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module) -> nn.Module:
    """Rank 0: a plain (unsharded) copy of an FSDP model holding its current weights, for what
    runs on rank 0 alone (evaluation, figures); other ranks get ``model`` back. Collective under
    FSDP; without FSDP it returns ``model``."""
    if not is_sharded(model):
        return model
    sd = full_state_dict(model)
    if not D.is_main():
        return model
    plain = copy.deepcopy(model._multimae_skeleton[0]).to_empty(device="cpu")
    plain.load_state_dict(sd, strict=True)
    plain.train(model.training)
    return plain


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint directory written by :func:`save_sharded` (it has ``sharded/``)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(D.unwrap(model), optimizer)
    return {"model": msd, "optimizer": osd}


def save_sharded(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: Any, meta: Mapping[str, Any], keep_last: int) -> Path | None:
    """Write the checkpoint of ``step`` of an FSDP run (layout in the module docstring). Every rank
    calls it; returns the checkpoint directory on rank 0, ``None`` elsewhere."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    staging = root / f"{_STAGING_PREFIX}{step_dir_name(step)}"
    if D.is_main():
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir(parents=True)
    D.barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=staging)  # fsyncs its files
    _save_rank_rng(staging / f"rng-rank{D.get_rank()}.pt")
    weights = full_state_dict(model)  # collective; rank 0 only gets the tensors
    D.barrier()  # every shard is on disk
    out = None
    if D.is_main():
        state = {"optimizer": {}, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else {},
                 "step": step, "rng": capture_rng_state(), "parallel": "fsdp", "world_size": D.get_world_size()}
        out = save_checkpoint(run_dir, step, weights, state, {**meta, "parallel": "fsdp"}, keep_last,
                              extra_dirs={SHARDED_DIR: staging})
    D.barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return out


def _save_rank_rng(path: Path) -> None:
    torch.save(capture_rng_state(), path)
    fsync_file(path)  # the staging directory is moved into the checkpoint whole, then fsync'ed


def _holds_v1_transfer_names(sharded: Path) -> bool:
    """True for DCP shards written by a format-1 fine-tuning run (keys ``model.encoder.blocks.<i>.*``;
    pretraining kept its names, so only these need renaming)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - unreadable: dcp.load says so, naming the directory
        return False
    return any(k.startswith("model.encoder.blocks.") for k in keys)


def _renamed(sd: dict[str, Any], version: int) -> dict[str, Any]:
    """``{"model", "optimizer"}`` of :func:`_dcp_state` under format ``version``'s parameter names
    (model keys, the optimizer's per-parameter state and its groups' parameter lists; tensors shared)."""
    def rename(key: str) -> str:
        return transfer_name(key, version)

    osd = sd["optimizer"]
    groups = [{**g, "params": [rename(n) for n in g["params"]]} for g in osd.get("param_groups", [])]
    return {"model": {rename(k): v for k, v in sd["model"].items()},
            "optimizer": {**osd, "state": {rename(k): v for k, v in osd.get("state", {}).items()},
                          "param_groups": groups}}


def restore_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> tuple[int, dict[str, Any] | None]:
    """Load a :func:`save_sharded` checkpoint into ``model`` (sharded or not) and ``optimizer`` on
    every rank (collective); returns (step, this rank's RNG state to restore when the loop
    starts). Same contract as :func:`multimae.engine.state.restore_train_state`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = read_train_state(path)[0]  # the weights come from the shards (no rank reads them whole)
    sd = _dcp_state(model, optimizer)
    v1 = _holds_v1_transfer_names(path / SHARDED_DIR)
    try:
        if v1:  # a fine-tuning run of format 1: its shards carry the old encoder names
            sd = _renamed(sd, 1)
        dcp.load(sd, checkpoint_id=path / SHARDED_DIR, no_dist=not D.is_dist())
    except Exception as e:  # noqa: BLE001 - DCP raises several types (CheckpointException, ...)
        raise CheckpointError(f"cannot read the sharded train state {path / SHARDED_DIR}: {e}") from e
    if v1:
        sd = _renamed(sd, 2)
    set_state_dict(D.unwrap(model), optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = state.get("rng")
    own = path / SHARDED_DIR / f"rng-rank{D.get_rank()}.pt"
    if own.is_file() and int(state.get("world_size", -1)) == D.get_world_size():
        rng = torch.load(own, map_location="cpu", weights_only=True)
    return int(state["step"]), rng


def restore(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: Any) -> tuple[int, dict[str, Any] | None]:
    """Resume from any checkpoint of this library: a sharded one through DCP (:func:`restore_sharded`,
    collective), a DDP one as before (:func:`multimae.engine.state.restore_train_state`), which an
    FSDP-sharded model cannot take (a clear :class:`CheckpointError`)."""
    if is_sharded_checkpoint(path):
        return restore_sharded(path, model, optimizer, scheduler, scaler)
    if is_sharded(model):
        raise CheckpointError(f"{path} was written by a train.parallel=ddp run (it has no {SHARDED_DIR}/ "
                              "directory): resume it with train.parallel=ddp")
    from multimae.engine.state import restore_train_state

    return restore_train_state(Path(path), model, optimizer, scheduler, scaler)
