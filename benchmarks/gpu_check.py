"""GPU check: one command that tells the first user with a GPU whether the fast paths work and how fast they are.

    python benchmarks/gpu_check.py                  # on a CUDA machine: <= ~6 min on one GPU
    python benchmarks/gpu_check.py --dry-run        # the same code on the CPU at tiny size (~30 s)

Writes ``benchmarks/results/gpu_check.md`` and ``.json`` (``--dry-run``: ``--out`` or a temporary
directory, never the committed results). Sections, each run even when an earlier one failed (a
failure is recorded in the report and makes the exit code 1):

* environment: GPU, torch / CUDA, the nominal dense bf16 peak of the GPU (table below; "unknown"
  otherwise) and a measured bf16 matmul peak;
* attention: ``torch.backends.cuda.flash_sdp_enabled()``, a probe forward of the pretraining model
  under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (only the flash kernel allowed: it fails if
  flash cannot run), and the flash ops torch.profiler sees in one ordinary training step;
* optimizer: that ``build_optimizer`` built fused AdamW and that the fused kernel ran (profiler);
* pre-training: ViT-B at the official setting (``configs/pretrain/multimae-b-1600e.yaml``: rgb +
  depth + semseg in, rgb / depth / semseg / norm_rgb out, 224 px, 98 visible tokens from a fresh
  Dirichlet plan per step, AdamW, bf16 autocast) -- ``train_step`` eager and ``torch.compile``-d:
  img/s, s/step, peak memory (``torch.cuda.max_memory_allocated``), model FLOPs per step
  (``FlopCounterMode`` on one eager step) and MFU against the nominal and measured peaks;
* distributed: the same step in a 1-rank process group (NCCL; gloo on the CPU) under DDP and
  under FSDP2 (``torch.distributed.fsdp.fully_shard``);
* FSDP start-up on the meta device (``section_fsdp_meta``): the model built on meta, sharded,
  materialised on the device; time, memory, weights bitwise equal to a plain build, one step;
* fine-tuning: one ``train_step`` per head at its recipe (ConvNeXt semseg ``nyuv2-semseg-rgb``,
  DPT depth ``nyuv2-depth``, linear classification ``in1k-cls``), through ``build_transfer_model``;
* step checks: host syncs per training step outside log steps (``HostSyncCounter``: bool / int /
  float / item / tolist / nonzero / boolean-mask indexing; the goal is 0) and the graph breaks of
  the forward + loss (``torch._dynamo.explain``; the goal is 1 graph, 0 breaks, as
  ``train.compile=true`` compiles with ``fullgraph=True``) of the pretraining step and every head;
* inference: the eval-mode forward (``torch.no_grad``, the step's precision) of each fine-tuned
  model and of the pretraining model at its recipe's evaluation batch;
* goal: >= 1500 img/s ViT-B pretraining on one H100 (the paper: ~444 img/s per A100), judged.
* JPEG decoding on the device (``section_jpeg_decode``): ``data.decode=cuda``'s batched nvJPEG decode +
  crop / resize / normalise against the CPU fast path: samples/s, rgb difference in 8-bit levels.

A batch that does not fit in memory is halved (up to three times) and the report says so.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
from common import H100_SXM_TFLOPS, count_flops, matmul_gflops, nominal_peak, sync, timed  # noqa: E402
from common import gpu_peak_gb as peak_memory_gb  # noqa: E402
from common import reset_gpu_peak as reset_memory  # noqa: E402
from common import write_text_atomic as write_atomic  # noqa: E402

# ----------------------------------------------------------------------------- library entry points
# Every multimae import of this script is here, so moving modules means editing this block only.
from multimae.core.batch import Batch
from multimae.core.config import load_config
from multimae.data.transfer import TARGET, TARGET_VALID
from multimae.engine.distributed import cleanup as dist_cleanup
from multimae.engine.distributed import init_distributed
from multimae.engine.host_sync import HostSyncCounter, graph_breaks
from multimae.engine.parallel import full_state_dict, materialise, parameters_on_meta, prepare_model
from multimae.core.masking import dirichlet_plan
from multimae.model.multimae import MultiMAE
from multimae.core.perf import cpu_model, tune_malloc
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.tasks.finetune import FinetuneObjective, build_loss, build_mixup
from multimae.tasks.finetune_config import FinetuneConfig, target_of
from multimae.engine.optim import build_optimizer, scaled_lr
from multimae.core.device import autocast
from multimae.engine.step import train_step
from multimae.model.transfer import build_transfer_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRETRAIN_CONFIG = "pretrain/multimae-b-1600e"
FINETUNE_CONFIGS = {"semseg (ConvNeXt)": "finetune/nyuv2-semseg-rgb", "depth (DPT)": "finetune/nyuv2-depth",
                    "cls (linear)": "finetune/in1k-cls"}
GOAL_H100_IMG_S = 1500.0
PAPER_A100_IMG_S = 444.0
# The GPU peak table (dense bf16 TFLOP/s by device name) is benchmarks/common.py's PEAK_BF16_TFLOPS.


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """What differs between the GPU run and the dry run; everything else is the same code."""

    device: torch.device
    dry_run: bool
    precision: str  # of the pretraining step and of inference
    backend: str  # process-group backend
    compile: bool
    pretrain_overrides: list[str]
    finetune_overrides: list[str]
    pretrain_batch: int | None  # None: the config's train.batch_size
    finetune_batch: int | None  # None: each recipe's train.batch_size
    warmup: int  # untimed steps before the timed ones (pretraining, fine-tuning, inference)
    steps: int  # timed pretraining steps per row
    ft_steps: int  # timed fine-tuning steps per head
    infer_steps: int  # timed inference forwards

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_setup(a: argparse.Namespace) -> Setup:
    if a.dry_run:
        # tiny preset at 32 px: 2 x 2 patches per modality, 12 tokens, 2 visible (1/6, as 98 of 588);
        # no warm-up and one timed step per row: the dry run proves the code runs, it measures nothing
        s = a.dry_run_size
        tiny = ["model.preset=tiny", f"model.image_size={s}", f"data.image_size={s}",
                f"mask.num_visible={max(1, 3 * (s // 16) ** 2 // 6)}"]
        ft = ["model.encoder.preset=tiny", f"model.encoder.image_size={s}", f"data.image_size={s}",
              "model.head.embed_dim=null", "train.eval_batch_size=2"]
        return Setup(torch.device("cpu"), True, a.precision or "fp32", "gloo", a.compile is True, tiny, ft,
                     a.batch or 2, 2, 0, a.steps or 1, 1, 1)
    return Setup(torch.device("cuda", torch.cuda.current_device()), False, a.precision or "bf16", "nccl",
                 a.compile is not False, [], [], a.batch, None, 3, a.steps or 10, 3, 5)


# ----------------------------------------------------------------------------- measuring
def profile_ops(fn: Callable[[], Any], dev: torch.device) -> dict[str, int]:
    """Op and kernel names torch.profiler records in one call -> occurrences."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    names: dict[str, int] = {}
    for e in prof.events():
        names[e.name] = names.get(e.name, 0) + 1
    return names


def matching(names: dict[str, int], *needles: str) -> dict[str, int]:
    return {k: v for k, v in sorted(names.items()) if any(n in k.lower() for n in needles)}


def run_timed(step: Callable[[int], Any], warmup: int, steps: int, dev: torch.device) -> dict[str, Any]:
    """Warm-up calls, then timed calls (each synchronised); ``step(i)`` gets a running index."""
    warm = [timed(lambda i=i: step(i), dev) for i in range(warmup)]
    times = [timed(lambda i=i: step(warmup + i), dev) for i in range(steps)]
    return {"warmup_s": warm, "times_s": times, "s_per_step": statistics.median(times)}


def with_oom_retry(run: Callable[[int], dict[str, Any]], batch: int, dev: torch.device, log: Callable[[str], None],
                   tries: int = 3) -> dict[str, Any]:
    """``run(batch)``; on CUDA out-of-memory, halve the batch (at most ``tries`` times)."""
    first = batch
    for _ in range(tries + 1):
        try:
            res = run(batch)
            if batch != first:
                res["note"] = f"batch reduced from {first} to {batch} (CUDA out of memory)"
            return res
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
        # outside the except block, so the failed attempt's tensors are freed
        log(f"  out of memory at batch {batch}; retrying at {batch // 2}")
        batch //= 2
        reset_memory(dev)
    raise RuntimeError(f"CUDA out of memory down to batch {batch}")


def rates(res: dict[str, Any], batch: int, flops: float | None, peaks: dict[str, float | None]) -> dict[str, Any]:
    """img/s, achieved TFLOP/s and MFU against each known peak (TFLOP/s)."""
    s = res["s_per_step"]
    res["batch"] = batch
    res["img_s"] = batch / s
    if flops:
        res["flops_per_step"] = flops
        res["tflops"] = flops / s / 1e12
        res["mfu"] = {k: (res["tflops"] / p if p else None) for k, p in peaks.items()}
    return res


# ----------------------------------------------------------------------------- pre-training
class Pretrain:
    """The official-setting MultiMAE, its AdamW and a cycle of random (batch, plan) on the device."""

    def __init__(self, setup: Setup, batch: int | None) -> None:
        self.cfg = load_config(PretrainConfig, PRETRAIN_CONFIG, setup.pretrain_overrides)
        self.setup, dev = setup, setup.device
        self.batch = batch or self.cfg.train.batch_size
        torch.manual_seed(0)
        self.model = MultiMAE(self.cfg.model).to(dev)
        self.size = self.cfg.model.image_size
        self.classes = self.model.input_specs["semseg"].num_classes
        counts = self.model.token_counts(self.size)
        g = torch.Generator().manual_seed(0)
        semseg_size = self.size // self.model.input_specs["semseg"].stride
        self.inputs = []
        for _ in range(4):  # distinct batches and plans, drawn before any timing
            b = {"rgb": torch.randn(self.batch, 3, self.size, self.size, generator=g),
                 "depth": torch.randn(self.batch, 1, self.size, self.size, generator=g),
                 "semseg": torch.randint(0, self.classes, (self.batch, semseg_size, semseg_size), generator=g)}
            plan = dirichlet_plan(counts, self.batch, self.cfg.mask.num_visible, self.cfg.mask.alpha, generator=g)
            self.inputs.append(({k: v.to(dev) for k, v in b.items()}, plan.to(dev)))
        self.net: torch.nn.Module = self.model
        self.opt: torch.optim.Optimizer | None = None

    def make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        self.opt = build_optimizer(self.model, lr=scaled_lr(o.base_lr, self.batch), betas=tuple(o.betas),
                                   weight_decay=o.weight_decay, implementation=o.implementation,
                                   no_decay_norm_bias=not o.decay_norm_bias,
                                   no_decay_names=sorted(self.model.no_weight_decay()))
        return self.opt

    def step(self, i: int) -> dict[str, float]:
        b, plan = self.inputs[i % len(self.inputs)]
        assert self.opt is not None
        return train_step(self.net, b, self.opt, plan, precision=self.setup.precision)

    def forward(self, i: int = 0) -> Any:
        b, plan = self.inputs[i % len(self.inputs)]
        with autocast(self.setup.precision, self.setup.device):
            return self.net(b, plan)


def section_attention_and_optimizer(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = setup.device
    reset_memory(dev)
    pt = Pretrain(setup, 2 if setup.cuda else setup.pretrain_batch)
    opt = pt.make_optimizer()
    out: dict[str, Any] = {"flash_sdp_enabled": bool(torch.backends.cuda.flash_sdp_enabled()),
                           "precision": setup.precision}
    if setup.cuda:
        fn = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        out["flash_attention_available"] = bool(fn()) if fn is not None else None
    # probe: only the flash kernel allowed; SDPA raises "No available kernel" if flash cannot run
    pt.model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = pt.forward(0)
            sync(dev)
        out["forced_flash_forward"] = "ok"
        out["forced_flash_loss"] = float(o.loss)
    except RuntimeError as e:
        out["forced_flash_forward"] = f"failed: {str(e).splitlines()[0][:300]}"
    pt.model.train()
    # one ordinary training step (default SDPA dispatch), profiled
    if setup.warmup:
        pt.step(0)  # warm-up (lazy CUDA init, cuBLAS handles, AdamW state)
    names = profile_ops(lambda: pt.step(1), dev)
    out["flash_ops_in_step"] = matching(names, "flash")
    out["other_attention_ops_in_step"] = matching(names, "efficient_attention", "_scaled_dot_product_attention_math",
                                                  "cudnn_attention")
    group = opt.param_groups[0]
    out["adamw_fused_flag"] = bool(group.get("fused"))
    out["adamw_implementation_config"] = pt.cfg.optim.implementation
    out["fused_adamw_ops_in_step"] = matching(names, "fused_adam")
    out["flash_ok"] = out["forced_flash_forward"] == "ok" and bool(out["flash_ops_in_step"])
    out["fused_adamw_ok"] = out["adamw_fused_flag"] and bool(out["fused_adamw_ops_in_step"])
    log(f"  flash: forced forward {out['forced_flash_forward']}, ops in step {sorted(out['flash_ops_in_step'])[:3]}; "
        f"fused AdamW flag {out['adamw_fused_flag']}, ops {sorted(out['fused_adamw_ops_in_step'])}")
    return out


def _pretrain_run(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None], mode: str,
                  batch: int) -> dict[str, Any]:
    """mode: eager | compiled | ddp | fsdp."""
    dev = setup.device
    reset_memory(dev)
    pt = Pretrain(setup, batch)
    extra: dict[str, Any] = {}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # multimae.engine.distributed.wrap_ddp returns the bare model at world size 1, so DDP is applied here
        pt.net = DistributedDataParallel(pt.model, device_ids=[dev.index] if setup.cuda else None)
        extra["wrapper"] = "torch DistributedDataParallel over the group from multimae.engine.distributed.init_distributed"
    elif mode == "fsdp":
        extra["wrapper"] = shard(pt.model)
    pt.make_optimizer()  # after sharding: FSDP2 replaces the parameters by DTensors
    flops = None
    if mode == "eager":  # the counted step is also the first warm-up step (not timed)
        flops = count_flops(lambda: pt.step(0))
        ctx["pretrain_flops"] = flops
    if mode == "compiled":
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        pt.net = torch.compile(pt.model, fullgraph=True)  # as train.compile=true (step checks: any break)
        t0 = time.perf_counter()
        pt.step(0)
        sync(dev)
        extra["first_step_s"] = time.perf_counter() - t0  # includes compilation
        c = torch._dynamo.utils.counters
        extra["graphs"] = int(c["stats"].get("unique_graphs", 0))
        breaks = c["graph_break"]
        extra["graph_breaks"] = int(sum(breaks.values()))
        extra["graph_break_reasons"] = [re.sub(r"\s+", " ", k).replace("`", "'")[:200]
                                        for k, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]
    reset_peak = torch.cuda.reset_peak_memory_stats if setup.cuda else (lambda *_: None)
    reset_peak(dev)
    # a wrapped model takes at least two steps: DDP reports unused parameters only on the second
    steps = setup.steps if mode in ("eager", "compiled") else max(2, setup.steps)
    res = run_timed(pt.step, setup.warmup, steps, dev)
    res["peak_memory_gb"] = peak_memory_gb(dev)
    res.update(extra)
    res = rates(res, pt.batch, flops or ctx.get("pretrain_flops"), ctx["peaks"])
    if mode == "compiled":  # which attention kernel the compiled graph calls
        res["flash_ops_in_step"] = matching(profile_ops(lambda: pt.step(1), dev), "flash")
    del pt
    return res


def section_pretrain(mode: str) -> Callable[[Setup, dict[str, Any], Callable[[str], None]], dict[str, Any]]:
    def run(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
        if mode == "compiled" and not setup.compile:
            return {"status": "skipped", "reason": "dry run (compiling takes minutes on a CPU; --compile forces it)"
                    if setup.dry_run else "--no-compile"}
        batch = ctx.get("pretrain_batch") or setup.pretrain_batch or \
            load_config(PretrainConfig, PRETRAIN_CONFIG, setup.pretrain_overrides).train.batch_size
        res = with_oom_retry(lambda b: _pretrain_run(setup, ctx, log, mode, b), batch, setup.device, log)
        ctx.setdefault("pretrain_batch", res["batch"])  # later rows use the batch that fitted
        log(f"  {mode}: {res['img_s']:.1f} img/s, {res['s_per_step'] * 1e3:.1f} ms/step, batch {res['batch']}")
        return res
    return run


# ----------------------------------------------------------------------------- distributed
def init_single_rank(setup: Setup) -> str:
    """A 1-rank process group through multimae.engine.distributed.init_distributed (torchrun's variables
    are set here when absent)."""
    if not torch.distributed.is_initialized():
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(k, v)
        init_distributed(setup.backend)
    return f"{torch.distributed.get_backend()}, world size {torch.distributed.get_world_size()}"


def shard(model: torch.nn.Module) -> str:
    """FSDP2 over ``model``: ``fully_shard`` on every encoder block, then on the root; fp32 parameters
    (the step's autocast computes in bf16), as the DDP row. Called directly: this library has no
    FSDP entry point on this branch (``train.parallel=fsdp`` is being added in multimae.parallel)."""
    from torch.distributed.fsdp import fully_shard

    for blk in model.encoder:
        fully_shard(blk)
    fully_shard(model)
    return "torch.distributed.fsdp.fully_shard on each encoder block and the root, called directly " \
           "(fp32 parameters + autocast; not multimae.parallel)"


def section_distributed(mode: str) -> Callable[[Setup, dict[str, Any], Callable[[str], None]], dict[str, Any]]:
    def run(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
        group = init_single_rank(setup)
        res = section_pretrain(mode)(setup, ctx, log)
        res["process_group"] = group
        eager = ctx["results"].get("pretrain_eager", {})
        if eager.get("img_s"):
            res["vs_eager"] = res["img_s"] / eager["img_s"]
        return res
    return run


def section_fsdp_meta(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """FSDP start-up on the meta device, as ``train.parallel=fsdp`` starts a run: the pretraining
    model built with its parameters on meta, sharded by ``prepare_model`` (here over a 1-rank group),
    materialised on the device (``materialise``: every parameter drawn on the CPU, this rank's shard
    kept); the start-up time and device memory, its weights against a plain CPU build of the same
    seed (bitwise), and one training step of the sharded model."""
    from types import SimpleNamespace

    group = init_single_rank(setup)
    cfg = load_config(PretrainConfig, PRETRAIN_CONFIG, setup.pretrain_overrides)
    dev = setup.device
    reset_memory(dev)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with parameters_on_meta():
        model = MultiMAE(cfg.model)
    built_on_meta = all(p.is_meta for p in model.parameters())
    train = SimpleNamespace(parallel="fsdp", activation_checkpointing=True, precision=setup.precision, init=None,
                            vis_every=0)
    one_rank = SimpleNamespace(is_distributed=True, world_size=1, device=dev)  # shard as a multi-rank run does
    prepare_model(model, train, one_rank)
    materialise(model, dev)
    sync(dev)
    res: dict[str, Any] = {"process_group": group, "built_on_meta": built_on_meta,
                           "start_up_s": time.perf_counter() - t0, "start_up_memory_gb": peak_memory_gb(dev),
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    full = full_state_dict(model)
    torch.manual_seed(0)
    plain = MultiMAE(cfg.model).state_dict()
    diff = [k for k in plain if not torch.equal(full[k].cpu(), plain[k])]
    res["weights_equal_plain_build"], res["weights_differing"] = not diff, diff[:5]
    del plain, full
    pt = Pretrain(setup, min(setup.pretrain_batch or 8, 8))
    pt.model = pt.net = model
    pt.make_optimizer()
    res["step_loss"] = float(pt.step(0)["loss"])
    res["step_memory_gb"] = peak_memory_gb(dev)
    log(f"  meta start-up {res['start_up_s']:.1f} s, weights equal to a plain build: {not diff}")
    if diff:
        res.update(status="error", error=f"FSDP meta start-up weights differ from a plain build: {diff[:5]}")
    del pt, model
    return res


# ----------------------------------------------------------------------------- fine-tuning + inference
def finetune_batch(cfg: FinetuneConfig, model: torch.nn.Module, batch: int, g: torch.Generator,
                   dev: torch.device) -> dict[str, torch.Tensor]:
    s = cfg.data.image_size or cfg.model.encoder.image_size
    kind = cfg.model.head.kind
    b: dict[str, torch.Tensor] = {spec.key: torch.randn(batch, spec.channels, s, s, generator=g)
                                  for spec in model.input_specs.values()}
    if kind == "classification":
        b[TARGET] = torch.randint(0, cfg.model.head.num_classes, (batch,), generator=g)
    elif kind == "segmentation":
        b[TARGET] = torch.randint(0, cfg.model.head.num_classes, (batch, s, s), generator=g)
    else:
        b[TARGET] = torch.rand(batch, cfg.model.head.out_channels, s, s, generator=g) * 10
        b[TARGET_VALID] = torch.ones(batch, 1, s, s, dtype=torch.bool)
    return {k: v.to(dev) for k, v in b.items()}


def _finetune_run(setup: Setup, ctx: dict[str, Any], name: str, batch: int | None) -> dict[str, Any]:
    dev = setup.device
    reset_memory(dev)
    overrides = list(setup.finetune_overrides) + ([f"train.batch_size={batch}"] if batch else [])
    if setup.dry_run:
        overrides.append(f"train.precision={setup.precision}")
    cfg = load_config(FinetuneConfig, FINETUNE_CONFIGS[name], overrides)
    torch.manual_seed(0)
    model, _ = build_transfer_model(cfg.model, None)
    model.to(dev)
    objective = FinetuneObjective(model, build_loss(cfg), target_of(cfg), build_mixup(cfg))
    o, t = cfg.optim, cfg.train
    decay = dict(layer_decay=o.layer_decay, layer_id_fn=model.encoder_layer_ids(),
                 num_layers=model.num_layers) if o.layer_decay is not None else {}
    lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, t.batch_size)
    opt = build_optimizer(model, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                          implementation=o.implementation, no_decay_norm_bias=True,
                          no_decay_names=sorted(model.no_weight_decay()), **decay)
    g = torch.Generator().manual_seed(1)
    batches = [finetune_batch(cfg, model, t.batch_size, g, dev) for _ in range(2)]
    batches = [objective.mix(Batch.of(b)) for b in batches]  # mixup / cutmix: in the data path, as in training

    def step(i: int) -> dict[str, float]:
        return train_step(objective, batches[i % 2], opt, precision=t.precision, clip_grad=o.clip_grad)

    flops = count_flops(lambda: step(0))  # also the first warm-up step (not timed)
    torch.cuda.reset_peak_memory_stats(dev) if setup.cuda else None
    res = run_timed(step, setup.warmup, setup.ft_steps, dev)
    res["peak_memory_gb"] = peak_memory_gb(dev)
    res = rates(res, t.batch_size, flops, ctx["peaks"])
    res.update(config=FINETUNE_CONFIGS[name], precision=t.precision, image_size=cfg.data.image_size,
               adamw_fused=bool(opt.param_groups[0].get("fused")))
    # inference: the eval-mode forward at the recipe's evaluation batch
    eb = t.eval_batch_size or t.batch_size
    x = {k: v for k, v in finetune_batch(cfg, model, eb, g, dev).items() if k not in (TARGET, TARGET_VALID)}
    prec = t.precision if setup.dry_run else setup.precision
    model.eval()

    def infer(_: int) -> Any:
        with torch.no_grad(), autocast(prec, dev):
            return model(x)

    iflops = count_flops(lambda: infer(0))
    reset_memory(dev)
    inf = run_timed(infer, setup.warmup, setup.infer_steps, dev)
    inf["peak_memory_gb"] = peak_memory_gb(dev)
    inf = rates(inf, eb, iflops, ctx["peaks"])
    inf.update(precision=prec, image_size=cfg.data.image_size)
    ctx["results"].setdefault("inference", {})[name] = inf
    del model, objective, opt, batches
    return res


def section_finetune(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FINETUNE_CONFIGS:
        try:
            cfg_batch = setup.finetune_batch or load_config(FinetuneConfig, FINETUNE_CONFIGS[name],
                                                             setup.finetune_overrides).train.batch_size
            if setup.dry_run:
                cfg_batch = 2
            out[name] = with_oom_retry(lambda b, n=name: _finetune_run(setup, ctx, n, b), cfg_batch, setup.device, log)
            r = out[name]
            log(f"  {name}: {r['img_s']:.1f} img/s train ({r['precision']}, batch {r['batch']}), "
                f"{ctx['results']['inference'][name]['img_s']:.1f} img/s inference")
        except Exception as e:  # one head failing must not hide the others
            out[name] = {"status": "error", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-2000:]}
            log(f"  {name}: FAILED {type(e).__name__}: {e}")
    bad = [n for n, r in out.items() if r.get("status") == "error"]
    if bad:
        out["status"] = "error"
        out["error"] = f"failed heads: {', '.join(bad)}"
    return out


# ----------------------------------------------------------------------------- step checks
def _step_checks(step: Callable[[int], Any], loss: Callable[[], Any] | None, dev: torch.device) -> dict[str, Any]:
    """Host syncs of two training steps after a warm-up one, and the graph breaks of the forward +
    loss (``loss`` None: not traced)."""
    step(0)  # warm-up: lazy initialisation, AdamW state
    sync(dev)
    with HostSyncCounter() as c:
        step(1)
        step(2)
    sync(dev)
    traced = graph_breaks(loss) if loss is not None else {"graphs": None, "graph_breaks": None, "reasons": []}
    return {"syncs_per_step": c.total / 2, "sync_calls": dict(c.calls), **traced}


def section_step_checks(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    dev, out = setup.device, {}
    reset_memory(dev)
    pt = Pretrain(setup, 8 if setup.cuda else setup.pretrain_batch)
    pt.make_optimizer()
    out["pretrain"] = _step_checks(pt.step, lambda: pt.forward(0).loss, dev)
    del pt
    for name, config in FINETUNE_CONFIGS.items():
        reset_memory(dev)
        cfg = load_config(FinetuneConfig, config, setup.finetune_overrides)
        torch.manual_seed(0)
        model, _ = build_transfer_model(cfg.model, None)
        objective = FinetuneObjective(model.to(dev), build_loss(cfg), target_of(cfg))  # mixup: data path
        opt = build_optimizer(model, lr=1e-4)
        batches = [finetune_batch(cfg, model, 2, torch.Generator().manual_seed(i), dev) for i in range(2)]
        prec = cfg.train.precision if setup.cuda else setup.precision

        def step(i: int, o: Any = objective, b: list = batches, op: Any = opt, p: str = prec) -> Any:
            return train_step(o, b[i % 2], op, precision=p, clip_grad=1.0)

        def loss(o: Any = objective, b: dict = batches[0], p: str = prec) -> Any:
            with autocast(p, dev):
                return o(b).loss
        # a dry run traces the pretraining step only (tests/engine/test_fullgraph.py traces every head on the CPU)
        out[name] = _step_checks(step, None if setup.dry_run else loss, dev)
        del model, objective, opt, batches
    for name, r in out.items():
        log(f"  {name}: {r['syncs_per_step']:g} host syncs per step, {_f(r['graphs'], '{}')} graph(s), "
            f"{_f(r['graph_breaks'], '{}')} graph break(s)")
    bad = [n for n, r in out.items() if r["syncs_per_step"] or r["graph_breaks"]]
    out["verdict"] = ("no host sync and no graph break in any step" if not bad else
                      f"host syncs or graph breaks in: {', '.join(bad)}")
    return out


def step_checks_md(r: dict[str, Any]) -> list[str]:
    """The report's section on host syncs and graph breaks."""
    L = ["## Host syncs and graph breaks", "",
         "Calls that read a device value in a training step (`multimae.engine.host_sync.HostSyncCounter`, two steps "
         "after a warm-up, no log step) and `torch._dynamo.explain` of the forward + loss.", "",
         "| step | host syncs / step | calls | graphs | graph breaks | first reasons |", "|---|---|---|---|---|---|"]
    if r.get("status") == "error":
        return L[:2] + [f"FAILED: {r['error']}", ""]
    for name, x in r.items():
        if isinstance(x, dict) and "syncs_per_step" in x:
            calls = ", ".join(f"`{k}` x{v}" for k, v in x["sync_calls"].items()) or "none"
            why = "; ".join(f"`{w}`" for w in x["reasons"]) or "-"
            L.append(f"| {name} | {x['syncs_per_step']:g} | {calls} | {_f(x['graphs'], '{}')} | "
                     f"{_f(x['graph_breaks'], '{}')} | {why} |")
    return L + ["", f"**{r.get('verdict', 'not judged')}**", ""]


def section_inference_pretrain(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The pretraining model's eval forward with rgb only: every decoder predicts (cross-modal)."""
    dev = setup.device
    reset_memory(dev)
    pt = Pretrain(setup, ctx.get("pretrain_batch") or setup.pretrain_batch)
    pt.model.eval()
    x = {"rgb": pt.inputs[0][0]["rgb"]}

    def infer(_: int) -> Any:
        with torch.no_grad(), autocast(setup.precision, dev):
            return pt.model(x, compute_loss=False)

    flops = count_flops(lambda: infer(0))
    reset_memory(dev)
    res = run_timed(infer, setup.warmup, setup.infer_steps, dev)
    res["peak_memory_gb"] = peak_memory_gb(dev)
    res = rates(res, pt.batch, flops, ctx["peaks"])
    res.update(precision=setup.precision, inputs="rgb (all 196 tokens), all decoders")
    ctx["results"].setdefault("inference", {})["pretrain model, rgb -> all"] = res
    log(f"  pretrain model forward: {res['img_s']:.1f} img/s")
    return res


# ----------------------------------------------------------------------------- environment + goal
def measured_matmul_peak(dev: torch.device) -> float:
    """Best TFLOP/s of a square bf16 matmul (8192 on a GPU, 512 on the CPU)."""
    return matmul_gflops(dev, torch.bfloat16, (8192,) if dev.type == "cuda" else (512,),
                         repeats=5 if dev.type == "cuda" else 2) / 1e3


def section_environment(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    dev = setup.device
    out: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "cpu": cpu_model(), "cpus": os.cpu_count(), "dry_run": setup.dry_run}
    if setup.cuda:
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=torch.cuda.get_device_name(dev), capability=f"{p.major}.{p.minor}",
                   memory_gb=p.total_memory / 2**30, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
        nominal, entry = nominal_peak(out["gpu"])
    else:
        out["gpu"] = "none (dry run on the CPU)"
        nominal, entry = None, "unknown (CPU)"
    out["nominal_bf16_tflops"], out["peak_table_entry"] = nominal, entry
    out["measured_bf16_matmul_tflops"] = measured_matmul_peak(dev)
    ctx["peaks"] = {"nominal": nominal, "measured": out["measured_bf16_matmul_tflops"]}
    log(f"  {out['gpu']}; nominal bf16 peak {nominal} ({entry}); measured {out['measured_bf16_matmul_tflops']:.2f} TFLOP/s")
    return out


def judge_goal(results: dict[str, Any]) -> dict[str, Any]:
    env = results.get("environment", {})
    rows = {k: results.get(k, {}) for k in ("pretrain_eager", "pretrain_compiled")}
    got = {k: r["img_s"] for k, r in rows.items() if isinstance(r, dict) and r.get("img_s")}
    if not got:
        return {"verdict": "no pretraining throughput measured"}
    best_key = max(got, key=got.get)
    best = got[best_key]
    out: dict[str, Any] = {"best_img_s": best, "best_row": best_key, "goal_h100_img_s": GOAL_H100_IMG_S,
                           "paper_a100_img_s": PAPER_A100_IMG_S}
    if env.get("dry_run"):
        out["verdict"] = "not judged: dry run (tiny model on the CPU; the numbers only prove the code runs)"
        return out
    gpu, nominal = env.get("gpu", ""), env.get("nominal_bf16_tflops")
    if "H100" in gpu and env.get("peak_table_entry", "").startswith("H100"):
        ok = best >= GOAL_H100_IMG_S
        out["verdict"] = (f"{'MET' if ok else 'NOT MET'}: {best:.0f} img/s ({best_key}) on {gpu} against the goal of "
                          f"{GOAL_H100_IMG_S:.0f} img/s; {best / PAPER_A100_IMG_S:.1f}x the paper's "
                          f"{PAPER_A100_IMG_S:.0f} img/s per A100")
        out["met"] = ok
    elif nominal:
        equiv = GOAL_H100_IMG_S * nominal / H100_SXM_TFLOPS
        out["goal_scaled_img_s"] = equiv
        out["verdict"] = (f"not an H100: {best:.0f} img/s ({best_key}) on {gpu}; the goal scaled by the nominal bf16 "
                          f"peak ({nominal:.0f} / {H100_SXM_TFLOPS:.0f} TFLOP/s) is {equiv:.0f} img/s, which this run "
                          f"{'meets' if best >= equiv else 'does not meet'} (an estimate, not the goal); "
                          f"{best / PAPER_A100_IMG_S:.2f}x the paper's {PAPER_A100_IMG_S:.0f} img/s per A100")
    else:
        out["verdict"] = (f"not judged: {gpu} has no known bf16 peak; {best:.0f} img/s ({best_key}), "
                          f"{best / PAPER_A100_IMG_S:.2f}x the paper's {PAPER_A100_IMG_S:.0f} img/s per A100")
    return out


# ----------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mfu(r: dict[str, Any]) -> str:
    m = r.get("mfu") or {}
    parts = []
    if m.get("nominal") is not None:
        parts.append(f"{100 * m['nominal']:.1f}% nominal")
    if m.get("measured") is not None:
        parts.append(f"{100 * m['measured']:.1f}% measured")
    return ", ".join(parts) or "-"


def _prec(p: str) -> str:
    return "fp32 (no autocast; TF32 matmuls on a GPU)" if p == "fp32" else f"{p} autocast"


def _flash_verdict(att: dict[str, Any]) -> str:
    if att.get("flash_ok"):
        return "flash SDPA used"
    forced = att.get("forced_flash_forward") == "ok"
    other = ", ".join(att.get("other_attention_ops_in_step") or {}) or "no fused attention op"
    return (f"flash SDPA NOT used by default: it runs when forced, but the ordinary step called {other}" if forced
            else "flash SDPA NOT available: the forced probe failed")


def _row(name: str, r: dict[str, Any]) -> str:
    if not isinstance(r, dict) or r.get("status") in ("error", "skipped") or "img_s" not in r:
        why = (r or {}).get("error") or (r or {}).get("reason") or "not run"
        return f"| {name} | {(r or {}).get('status', 'not run')}: {why} | | | | | | |"
    return (f"| {name} | {r['batch']} | {_f(r['img_s'])} | {_f(r['s_per_step'] * 1e3)} | {_f(r.get('peak_memory_gb'), '{:.2f}')} "
            f"| {_f((r.get('flops_per_step') or 0) / 1e9 or None)} | {_f(r.get('tflops'), '{:.2f}')} | {_mfu(r)} |")


HEADER = ("| row | batch | img/s | ms/step | peak mem (GB) | GFLOP/step | TFLOP/s | MFU |\n"
          "|---|---|---|---|---|---|---|---|")


def markdown(res: dict[str, Any]) -> str:
    meta, R = res["meta"], res["results"]
    env = R.get("environment", {})
    att = R.get("attention_optimizer", {})
    L = ["# GPU check", "",
         f"Produced by `{meta['command']}` on {meta['date']} in {meta['wall_s']:.0f} s"
         + (" (DRY RUN: tiny model on the CPU; proves the code runs, the numbers mean nothing)" if meta["dry_run"] else "")
         + ".", "", "## Environment", ""]
    for k in ("gpu", "capability", "memory_gb", "gpus", "cuda", "torch", "python", "cpu", "cpus", "bf16_supported",
              "peak_table_entry", "nominal_bf16_tflops", "measured_bf16_matmul_tflops"):
        if k in env:
            v = env[k]
            L.append(f"- {k}: {_f(v, '{:.2f}') if isinstance(v, float) else v}")
    if env.get("status") == "error":
        L.append(f"- FAILED: {env['error']}")
    L += ["", "## Attention kernel (flash SDPA)", ""]
    if att.get("status") == "error":
        L.append(f"FAILED: {att['error']}")
    else:
        L += [f"- `torch.backends.cuda.flash_sdp_enabled()`: {att.get('flash_sdp_enabled')}",
              f"- probe forward under `sdpa_kernel(SDPBackend.FLASH_ATTENTION)`: {att.get('forced_flash_forward')}",
              f"- flash ops in one ordinary training step (torch.profiler): "
              f"{', '.join(f'`{k}` x{v}' for k, v in (att.get('flash_ops_in_step') or {}).items()) or 'none'}",
              f"- other attention kernels in that step: "
              f"{', '.join(f'`{k}` x{v}' for k, v in (att.get('other_attention_ops_in_step') or {}).items()) or 'none'}",
              f"- verdict: **{_flash_verdict(att)}**"]
    L += ["", "## Optimizer (fused AdamW)", ""]
    if att.get("status") != "error":
        L += [f"- `optim.implementation` of the config: `{att.get('adamw_implementation_config')}`; "
              f"`build_optimizer` gave `fused={att.get('adamw_fused_flag')}`",
              f"- fused kernels in the profiled step: "
              f"{', '.join(f'`{k}` x{v}' for k, v in (att.get('fused_adamw_ops_in_step') or {}).items()) or 'none'}",
              f"- verdict: **{'fused AdamW used' if att.get('fused_adamw_ok') else 'fused AdamW NOT confirmed'}**"]
    L += ["", "## Pre-training step", "",
          f"`{PRETRAIN_CONFIG}` (rgb + depth + semseg in, rgb / depth / semseg / norm_rgb out, "
          f"{meta['image_size']} px, {meta['num_visible']} visible tokens, fresh Dirichlet plans, AdamW from "
          f"`build_optimizer`), `train_step` with {_prec(meta['precision'])}; random inputs on the device; "
          f"median of the timed steps (each synchronised). MFU: achieved FLOP/s (FlopCounterMode on one eager "
          f"step) over the nominal bf16 peak of the GPU and over the measured bf16 matmul peak.", "", HEADER]
    for k, name in (("pretrain_eager", "eager"), ("pretrain_compiled", "torch.compile"),
                    ("ddp", "DDP, 1 rank"), ("fsdp", "FSDP2, 1 rank")):
        L.append(_row(name, R.get(k, {})))
    comp = R.get("pretrain_compiled", {})
    if comp.get("first_step_s") is not None:
        L += ["", f"torch.compile: first step (compilation) {comp['first_step_s']:.1f} s, {comp.get('graphs')} graphs, "
                  f"{comp.get('graph_breaks')} graph breaks"
              + (": " + "; ".join(f"`{r}`" for r in comp.get("graph_break_reasons", [])) if comp.get("graph_breaks") else "")
              + "; flash ops in a compiled step: "
              + (", ".join(f"`{k}` x{v}" for k, v in (comp.get("flash_ops_in_step") or {}).items()) or "none") + "."]
    for k in ("ddp", "fsdp"):
        r = R.get(k, {})
        if r.get("wrapper"):
            L.append(f"\n{k.upper()}: {r['wrapper']}; process group {r.get('process_group')}"
                     + (f"; {r['vs_eager']:.2f}x the eager img/s" if r.get("vs_eager") else "") + ".")
    fm = R.get("fsdp_meta", {})
    if fm:
        L.append("\nFSDP start-up on the meta device (`train.parallel=fsdp`, 1 rank, activation checkpointing): "
                 + (f"FAILED: {fm['error']}" if fm.get("status") == "error" else
                    f"built on meta {fm.get('built_on_meta')}, sharded and materialised in {_f(fm.get('start_up_s'))} s, "
                    f"device memory {_f(fm.get('start_up_memory_gb'), '{:.2f}')} GB after start-up, "
                    f"{_f(fm.get('step_memory_gb'), '{:.2f}')} GB peak with one step (loss {_f(fm.get('step_loss'), '{:.3f}')}); "
                    f"weights equal to a plain CPU build of the same seed: **{fm.get('weights_equal_plain_build')}**."))
    notes = [r["note"] for r in R.values() if isinstance(r, dict) and r.get("note")]
    L += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    L += ["## Fine-tuning step per head", "",
          "One `train_step` per head at its recipe (config, image size, batch, precision), model from "
          "`build_transfer_model` (random init), AdamW with layer decay from `build_optimizer`, random inputs.", "",
          HEADER]
    ft = R.get("finetune", {})
    for name in FINETUNE_CONFIGS:
        r = ft.get(name, {})
        label = f"{name}: `{r.get('config', FINETUNE_CONFIGS[name])}`, {r.get('image_size', '?')} px, {r.get('precision', '?')}"
        L.append(_row(label, r))
    L += ["", "MFU is always against the bf16 peaks; the depth recipe trains in fp32 (official), whose TF32 peak "
          "is half the bf16 one on A100 / H100.", ""]
    L += step_checks_md(R.get("step_checks", {}))
    L += ["## Inference", "", "Eval-mode forward (`torch.no_grad`) at the recipe's evaluation batch "
          "(the model's forward, not `multimae.apps.predict.Predictor`: no decoding or resizing).", "", HEADER]
    for name, r in (R.get("inference") or {}).items():
        L.append(_row(f"{name} ({r.get('precision')}, {r.get('image_size', meta['image_size'])} px)", r))
    if (R.get("inference_pretrain") or {}).get("status") == "error":
        L.append(_row("pretrain model", R["inference_pretrain"]))
    if "jpeg_decode" in R:
        L += [""] + jpeg_decode_md(R["jpeg_decode"])
    goal = R.get("goal", {})
    L += ["", "## Goal", "", f">= {GOAL_H100_IMG_S:.0f} img/s ViT-B pretraining at this setting on one H100 (the paper: "
          f"~{PAPER_A100_IMG_S:.0f} img/s per A100).", "", f"**{goal.get('verdict', 'not judged')}**", ""]
    failed = [k for k, r in R.items() if isinstance(r, dict) and r.get("status") == "error"]
    L += ["## Failures", ""] + ([f"- {k}: {R[k]['error']}" for k in failed] or ["none"]) + [""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- JPEG decoding on the device
def section_jpeg_decode(setup: Setup, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """``data.decode=cuda`` (:mod:`multimae.data.device_decode`): a batch of 256 px JPEGs (half
    4:4:4 q95 as ``multimae data`` writes them, half 4:2:0 q90 as most photos are) decoded by one
    ``torchvision.io.decode_jpeg(list, device=...)`` call, cropped, resized to 224 and normalised on
    the device, against the CPU fast path (simplejpeg + torch's uint8 resize, one thread) on the same
    crops: samples/s of each, the CPU seconds a worker still spends per sample (JPEG header, crop
    draw), and how far the rgb values are apart in 8-bit levels. In a dry run the "device" is the
    CPU (nvJPEG is not exercised; the numbers mean nothing)."""
    from PIL import Image

    from multimae.core import modalities
    from multimae.data.codecs import decode_encoded, decode_packed
    from multimae.data.device_decode import DeferredImages
    from multimae.data.synthetic import SyntheticScenes
    from multimae.data.transforms import PairedTransform

    dev = setup.device
    n, batch, side, size = (16, 8, 64, 32) if setup.dry_run else (1024, 256, 256, 224)
    scenes = SyntheticScenes(n, image_size=side, seed=0, modalities=["rgb"])
    files = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(scenes[i]["rgb"].permute(1, 2, 0).numpy()).save(
            buf, format="JPEG", quality=95 if i % 2 else 90, subsampling=0 if i % 2 else 2)
        files.append(buf.getvalue())
    spec = modalities.resolve(["rgb"])[0]
    tf = PairedTransform([spec], size, fast=True, seed=0)

    def run(decode: Callable[..., Any]) -> tuple[list[Any], float]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            c = time.process_time()
            out = [tf({"__key__": f"{i:06d}", "rgb": decode(files[i], "jpg", spec, 1.0, f"{i}.jpg")})["rgb"]
                   for i in range(n)]
            return out, time.process_time() - c
        finally:
            torch.set_num_threads(threads)

    cpu_out, cpu_s = run(decode_packed)
    run(decode_encoded)  # warm-up
    deferred, worker_s = run(decode_encoded)
    groups = [DeferredImages.of(deferred[a:a + batch], list(range(len(deferred[a:a + batch]))))
              for a in range(0, n, batch)]
    ready = torch.zeros(batch, 3, size, size)

    def device_pass() -> list[Tensor]:
        return [g.finish(ready[:len(g.index)], dev) for g in groups]

    from torchvision.io import ImageReadMode, decode_jpeg

    device_pass()  # warm-up (nvJPEG's handles, the kernels)
    sync(dev)
    t = time.perf_counter()
    outs = device_pass()
    sync(dev)
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    for g in groups:
        decode_jpeg(g.files(), mode=ImageReadMode.RGB, device=dev)
    sync(dev)
    decode_s = time.perf_counter() - t
    got = torch.cat([o.cpu() for o in outs])
    want = torch.stack(cpu_out)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    levels = ((got - want).abs() * std * 255.0)
    return {"device": str(dev) + (" (dry run: the CPU's libjpeg-turbo, not nvJPEG)" if setup.dry_run else ""),
            "images": n, "batch": batch, "source_px": side, "crop_px": size,
            "cpu_path_samples_per_cpu_s": n / cpu_s,
            "worker_samples_per_cpu_s": n / worker_s,
            "device_samples_per_s": n / full_s, "device_decode_only_samples_per_s": n / decode_s,
            "max_abs_levels": float(levels.max()), "mean_abs_levels": float(levels.mean()),
            "pixels_over_1_level_pct": 100.0 * float((levels > 1.001).float().mean()),
            "max_abs_levels_444": float(levels[1::2].max()), "max_abs_levels_420": float(levels[0::2].max())}


def jpeg_decode_md(r: dict[str, Any]) -> list[str]:
    L = ["## JPEG decoding on the device (`data.decode=cuda`)", ""]
    if not r or r.get("status") == "error":
        return L + [f"FAILED: {(r or {}).get('error', 'not run')}", ""]
    return L + [
        f"{r['images']} JPEGs of {r['source_px']} px (half 4:4:4 q95, half 4:2:0 q90), batch {r['batch']}, crops resized "
        f"to {r['crop_px']} px on {r['device']}:", "",
        f"- device decode + crop + resize + normalise: {_f(r['device_samples_per_s'])} samples/s "
        f"(decode alone {_f(r['device_decode_only_samples_per_s'])})",
        f"- what a worker still does per sample (JPEG header, crop draw): {_f(r['worker_samples_per_cpu_s'])} samples "
        f"per CPU second; the CPU fast path (decode + resize + normalise): {_f(r['cpu_path_samples_per_cpu_s'])}",
        f"- rgb vs the CPU fast path, in 8-bit levels: max {_f(r['max_abs_levels'], '{:.2f}')} (4:4:4 "
        f"{_f(r['max_abs_levels_444'], '{:.2f}')}, 4:2:0 {_f(r['max_abs_levels_420'], '{:.2f}')}), mean "
        f"{_f(r['mean_abs_levels'], '{:.3f}')}, pixels more than one level apart {_f(r['pixels_over_1_level_pct'], '{:.3f}')}%",
        ""]


# ----------------------------------------------------------------------------- main
SECTIONS: list[tuple[str, Callable[[Setup, dict[str, Any], Callable[[str], None]], dict[str, Any]]]] = [
    ("environment", section_environment),
    ("attention_optimizer", section_attention_and_optimizer),
    ("pretrain_eager", section_pretrain("eager")),
    ("pretrain_compiled", section_pretrain("compiled")),
    ("ddp", section_distributed("ddp")),
    ("fsdp", section_distributed("fsdp")),
    ("fsdp_meta", section_fsdp_meta),
    ("finetune", section_finetune),
    ("step_checks", section_step_checks),
    ("inference_pretrain", section_inference_pretrain),
    ("jpeg_decode", section_jpeg_decode),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny size (gloo, no compile)")
    ap.add_argument("--out", default=None, help="directory for gpu_check.md/.json (default benchmarks/results; "
                                                "--dry-run: a temporary directory)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time the torch.compile'd step (default: on a GPU yes, in a dry run no)")
    ap.add_argument("--batch", type=int, default=None, help="pretraining batch (default: the config's 256; dry run 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed pretraining steps per row (default 10; dry run 2)")
    ap.add_argument("--precision", choices=["bf16", "fp32", "fp16"], default=None,
                    help="of the pretraining step and inference (default bf16; dry run fp32)")
    ap.add_argument("--dry-run-size", type=int, default=32, help="image size of the dry run (multiple of 16)")
    ap.add_argument("--only", default=None, help=f"comma list of sections ({', '.join(n for n, _ in SECTIONS)})")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU, "
              "or use --dry-run to exercise the same code on the CPU at tiny size.", file=sys.stderr)
        return 2
    setup = make_setup(a)
    out_dir = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="gpu_check-")) if a.dry_run else RESULTS)
    tune_malloc()
    if setup.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif a.dry_run:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; a shared machine loses a lot
    only = set(a.only.split(",")) if a.only else None
    unknown = (only or set()) - {n for n, _ in SECTIONS}
    if unknown:
        print(f"gpu_check: --only: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    pcfg = load_config(PretrainConfig, PRETRAIN_CONFIG, setup.pretrain_overrides)
    t_start = time.perf_counter()
    ctx: dict[str, Any] = {"results": {}, "peaks": {"nominal": None, "measured": None}}
    res = {"meta": {"command": "python benchmarks/gpu_check.py " + shlex.join(argv), "dry_run": setup.dry_run,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "precision": setup.precision, "image_size": pcfg.model.image_size,
                    "num_visible": pcfg.mask.num_visible, "wall_s": 0.0},
           "results": ctx["results"]}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def write() -> None:
        res["meta"]["wall_s"] = time.perf_counter() - t_start
        write_atomic(out_dir / "gpu_check.json", json.dumps(res, indent=1, default=str))
        write_atomic(out_dir / "gpu_check.md", markdown(res))

    try:
        for name, fn in SECTIONS:
            if only is not None and name not in only and name != "environment":
                continue
            log(f"[{time.perf_counter() - t_start:6.1f}s] {name}")
            t0 = time.perf_counter()
            try:
                r = fn(setup, ctx, log)
            except Exception as e:  # record and go on: the report is most useful when it is complete
                r = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
                     "traceback": traceback.format_exc()[-3000:]}
                log(f"  FAILED: {r['error']}")
            r.setdefault("status", "ok")
            r["section_s"] = time.perf_counter() - t0
            if name in ctx["results"] and isinstance(ctx["results"][name], dict):  # e.g. inference filled earlier
                ctx["results"][name].update(r)
            else:
                ctx["results"][name] = r
            ctx["results"]["goal"] = judge_goal(ctx["results"])
            write()
    finally:
        dist_cleanup()
    print(markdown(res))
    log(f"wrote {out_dir / 'gpu_check.md'} and .json")
    failed = [k for k, r in ctx["results"].items() if isinstance(r, dict) and r.get("status") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
