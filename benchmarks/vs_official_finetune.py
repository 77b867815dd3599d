"""The fine-tuning half of the head-to-head with the official MultiMAE code (run it through
``python benchmarks/vs_official.py --finetune TASKS``, or ``python benchmarks/vs_official_finetune.py
TASKS [options]``, the same): one step of each official fine-tuning setting -- semseg from rgb and
from rgb+depth (ConvNeXt adapter), depth (DPT adapter), classification (linear adapter) -- every
token, no masking, fp32, official MultiViT against this project's transfer model + task loss, at
the official configs' image sizes and batches unless ``--ft-size`` / ``--ft-batch`` say otherwise.
The pretraining results already in ``--out``'s .json are kept; ``--ft-render`` merges runs.

    python benchmarks/vs_official.py --finetune all --ft-size semseg-rgb=256,semseg-rgbd=256 --ft-batch 2 \
        --threads 1 --steps 5 --warmup 1 --child-steps 2 --profile
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path

from common import machine_line  # noqa: E402
from vs_official_common import (ROOT, memory_cells, Step, interleaved, medians, preset_label, profile_ops, ratio,  # noqa: E402
                                read_json, run_child, write_json, write_results)

Render = Callable[[dict[str, Any]], str]  # the whole report (vs_official.markdown)


@dataclass(frozen=True)
class FtTask:
    """One fine-tuning setting: the official config's values (facts read off EPFL-VILAB/MultiMAE
    ``cfgs/finetune/...``, which the shared checkout does not hold) and this project's config of it."""

    label: str
    config: str  # this project's configs/finetune/<config>.yaml
    official_config: str
    inputs: tuple[str, ...]
    kind: str  # segmentation | depth | classification
    size: int  # official input_size
    batch: int  # official per-GPU batch_size
    num_classes: int
    drop_path: float
    lr: float | None  # absolute peak lr (None: blr * batch / 256)
    blr: float | None
    weight_decay: float
    layer_decay: float


FT_TASKS: dict[str, FtTask] = {
    "semseg-rgb": FtTask("semseg from rgb (ConvNeXt head)", "nyuv2-semseg-rgb",
                         "cfgs/finetune/semseg/nyu/ft_nyu_200e_multimae-b_rgb.yaml", ("rgb",), "segmentation",
                         640, 2, 40, 0.1, 1e-4, None, 0.05, 0.75),
    "semseg-rgbd": FtTask("semseg from rgb+depth (ConvNeXt head)", "nyuv2-semseg-rgbd",
                          "cfgs/finetune/semseg/nyu/ft_nyu_200e_multimae-b_rgb-depth.yaml", ("rgb", "depth"),
                          "segmentation", 640, 2, 40, 0.1, 1e-4, None, 0.05, 0.75),
    "depth": FtTask("depth from rgb (DPT head)", "nyuv2-depth", "cfgs/finetune/depth/ft_nyu_2000e_multimae-b.yaml",
                    ("rgb",), "depth", 256, 64, 1, 0.0, 1e-4, None, 1e-4, 0.75),
    "cls": FtTask("classification from rgb (linear head, mean pooling)", "in1k-cls",
                  "cfgs/finetune/cls/ft_in1k_100e_multimae-b.yaml", ("rgb",), "classification", 224, 128, 1000, 0.1,
                  None, 5e-4, 0.05, 0.65),
}
FT_TARGETS = {"speed": 1.2, "memory": 0.8}
SEG_IGNORE = 255  # the official SEG_IGNORE_INDEX and this project's data.ignore_index
PRESET_DIMS = {"base": (768, 12), "small": (384, 6), "tiny": (192, 3)}


def parse_per_task(spec: str, what: str) -> dict[str, int]:
    """``"256"`` (every task) or ``"semseg-rgb=640,depth=256"`` -> {task: value}; "" -> {}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, val = part.rpartition("=")
        names = [key] if key else list(FT_TASKS)
        bad = [n for n in names if n not in FT_TASKS]
        if bad or not val.isdigit() or int(val) < 1:
            raise SystemExit(f"vs_official: {what} {part!r}: expected N or TASK=N with TASK in {sorted(FT_TASKS)}")
        out.update({n: int(val) for n in names})
    return out


def ft_setting(name: str, a: argparse.Namespace) -> tuple[int, int]:
    """(image size, batch) of a fine-tuning task: the official ones unless --ft-size / --ft-batch say."""
    t = FT_TASKS[name]
    return parse_per_task(a.ft_size, "--ft-size").get(name, t.size), parse_per_task(a.ft_batch, "--ft-batch").get(name, t.batch)


def make_ft_batch(task: FtTask, size: int, batch: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs (rgb; depth already standardised, as both data pipelines hand it over) and the task's
    target under this project's batch keys: ``target`` (+ ``target_valid`` for depth)."""
    g = torch.Generator().manual_seed(seed)
    x = {"rgb": torch.randn(batch, 3, size, size, generator=g)}
    if "depth" in task.inputs:
        x["depth"] = torch.randn(batch, 1, size, size, generator=g)
    if task.kind == "segmentation":
        t = torch.randint(0, task.num_classes, (batch, size, size), generator=g)
        t[torch.rand(batch, size, size, generator=g) < 0.05] = SEG_IGNORE  # some unlabelled pixels
        x["target"] = t
    elif task.kind == "depth":
        x["target"] = torch.rand(batch, 1, size, size, generator=g) + 0.5
        x["target_valid"] = torch.rand(batch, 1, size, size, generator=g) > 0.1
    else:
        x["target"] = torch.randint(0, task.num_classes, (batch,), generator=g)
    return {k: v.to(device) for k, v in x.items()}


def _masked_berhu(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """berHu (reverse Huber, Laina et al. 2016) over the valid pixels, threshold 0.2 x the largest
    absolute error: the official depth fine-tuning loss, written from its formula (the official
    script is not in the shared checkout)."""
    d = (pred - target)[valid.expand_as(pred)]
    ad = d.abs()
    c = (0.2 * ad.max().detach()).clamp_min(1e-5)
    return torch.where(ad <= c, ad, (d * d + c * c) / (2 * c)).mean()


def official_ft_step(off: dict[str, Any], name: str, preset: str, size: int, batch: int,
                     device: torch.device) -> Step:
    """The official fine-tuning step at its config: MultiViT (no masking, every token) with the
    official input adapters and the task's official output adapter, layer-decayed AdamW from the
    official optimizer factory, forward, loss, backward and step through the official
    NativeScaler (grad norm measured, no clipping), fp32."""
    from functools import partial

    from timm.loss import LabelSmoothingCrossEntropy
    from torch import nn

    task = FT_TASKS[name]
    ia, oa, of = off["input_adapters"], off["output_adapters"], off["optim_factory"]
    model_name = f"multivit_{preset}"
    registry = sys.modules["utils.registry"]
    dim, heads = PRESET_DIMS[preset]
    if model_name not in registry._model_entrypoints:  # the official code registers base and large only

        def build(input_adapters: Any, output_adapters: Any, **kw: Any) -> nn.Module:
            return off["model"].MultiViT(input_adapters=input_adapters, output_adapters=output_adapters,
                                         dim_tokens=dim, depth=12, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
        build.__name__ = model_name
        registry.register_model(build)
    channels = {"rgb": 3, "depth": 1}
    inputs = {d: ia.PatchedInputAdapter(num_channels=channels[d], stride_level=1, patch_size_full=16, image_size=size,
                                        learnable_pos_emb=False) for d in task.inputs}
    if task.kind == "segmentation":  # decoder_dim 6144 (ViT-B configs), preds_per_patch 16, depth 4, main task rgb
        key = "semseg"
        head = oa.ConvNeXtAdapter(num_classes=task.num_classes, embed_dim=6144 if preset == "base" else 8 * dim,
                                  patch_size=16, preds_per_patch=16, depth=4, interpolate_mode="bilinear",
                                  main_tasks=["rgb"])
        crit = nn.CrossEntropyLoss(ignore_index=SEG_IGNORE)
        loss_fn = lambda p, x: crit(p, x["target"])  # noqa: E731
    elif task.kind == "depth":  # hooks [2, 5, 8, 11], layer dims [96, 192, 384, 768] for ViT-B, feature_dim 256
        key = "depth"
        head = oa.DPTOutputAdapter(num_classes=1, stride_level=1, patch_size=16, main_tasks=["rgb"],
                                   layer_dims=[dim // 8, dim // 4, dim // 2, dim], head_type="regression")
        loss_fn = lambda p, x: _masked_berhu(p, x["target"], x["target_valid"])  # noqa: E731
    else:  # mean pooling, label smoothing 0.1 (mixup / cutmix off on both sides)
        key = "cls"
        head = oa.LinearOutputAdapter(num_classes=task.num_classes, use_mean_pooling=True)
        crit = LabelSmoothingCrossEntropy(smoothing=0.1)
        loss_fn = lambda p, x: crit(p, x["target"])  # noqa: E731
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = off["utils"].create_model(model_name, input_adapters=inputs, output_adapters={key: head},
                                          drop_path_rate=task.drop_path).to(device)
        nl = model.get_num_layers()
        assigner = of.LayerDecayValueAssigner([task.layer_decay ** (nl + 1 - i) for i in range(nl + 2)])
        lr = task.lr if task.lr is not None else task.blr * batch / 256
        args = types.SimpleNamespace(opt="adamw", lr=lr, weight_decay=task.weight_decay, opt_eps=1e-8,
                                     opt_betas=[0.9, 0.999], momentum=0.9, decoder_decay=None, no_lr_scale_list="")
        opt = of.create_optimizer(args, model, skip_list=model.no_weight_decay(), get_num_layer=assigner.get_layer_id,
                                  get_layer_scale=assigner.get_scale)
    for g in opt.param_groups:  # what the official loop sets before every step
        g["lr"] = lr * g["lr_scale"]
    scaler = off["utils"].NativeScalerWithGradNormCount(enabled=False)  # fp32: no loss scaling on a CPU
    all_layers = task.kind == "depth"  # the official scripts' return_all_layers for DPT
    model.train()

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        preds = model({d: x[d] for d in task.inputs}, return_all_layers=all_layers)
        loss = loss_fn(preds[key], x)
        value = loss.item()
        opt.zero_grad()
        scaler(loss, opt, clip_grad=None, parameters=model.parameters(), create_graph=False)
        return {"loss": value}
    step.model = model  # type: ignore[attr-defined]
    return step


def our_ft_step(name: str, preset: str, size: int, batch: int, device: torch.device) -> Step:
    """This project's fine-tuning step as ``multimae finetune`` runs it: the shipped config of the
    task (fp32, mixup / cutmix off), ``build_transfer_model`` from scratch, the task loss of
    ``build_loss``, AdamW with layer-wise lr decay as the fine-tuning trainer builds it,
    ``model.attention`` and allocator tuning, one ``train_step``."""
    from multimae.core.config import load_config
    from multimae.model.layers.attention import set_attention
    from multimae.core.perf import tune_malloc
    from multimae.tasks.finetune import FinetuneObjective, build_loss
    from multimae.tasks.finetune_config import FinetuneConfig, target_of
    from multimae.engine.optim import build_optimizer, scaled_lr
    from multimae.engine.step import train_step
    from multimae.model.transfer import build_transfer_model

    task = FT_TASKS[name]
    over = [f"model.encoder.preset={preset}", f"model.encoder.image_size={size}", f"data.image_size={size}",
            f"train.batch_size={batch}", "train.precision=fp32", "aug.mixup=0", "aug.cutmix=0"]
    if preset != "base" and task.kind == "segmentation":
        over.append("model.head.embed_dim=null")  # 8 x dim, the ViT-B 6144 scaled
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / f"{task.config}.yaml", over)
    if cfg.train.tune_malloc:
        tune_malloc()
    torch.manual_seed(0)
    model, _ = build_transfer_model(cfg.model, "scratch")
    set_attention(model, cfg.model.attention)
    model.to(device)
    o = cfg.optim
    lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, batch)
    decay = dict(layer_decay=o.layer_decay, layer_id_fn=model.encoder_layer_ids(),
                 num_layers=model.num_layers) if o.layer_decay is not None else {}
    opt = build_optimizer(model, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                          implementation=o.implementation, no_decay_norm_bias=True,
                          no_decay_names=sorted(model.no_weight_decay()), **decay)
    objective = FinetuneObjective(model, build_loss(cfg), target_of(cfg), None)

    def step(x: dict[str, torch.Tensor]) -> dict[str, float]:
        return train_step(objective, x, opt, None, precision="fp32", clip_grad=o.clip_grad)
    step.model = model  # type: ignore[attr-defined]
    return step


def build_ft_variants(names: list[str], off: dict[str, Any] | None, task: str, preset: str, a: argparse.Namespace,
                      device: torch.device) -> dict[str, Step]:
    size, batch = ft_setting(task, a)
    out: dict[str, Step] = {}
    for n in names:
        if n == "official":
            assert off is not None
            out[n] = official_ft_step(off, task, preset, size, batch, device)
        else:
            out[n] = our_ft_step(task, preset, size, batch, device)
    return out


def ft_peak_memory(variant: str, task: str, a: argparse.Namespace) -> dict[str, Any] | None:
    return run_child(["--child", variant, "--finetune", task, "--presets", a.preset, "--official", str(a.official),
                      "--threads", str(a.threads), "--device", a.device, "--child-steps", str(a.child_steps),
                      "--ft-size", a.ft_size, "--ft-batch", a.ft_batch], f"{variant}/{task}")


def ft_child(a: argparse.Namespace, off: dict[str, Any] | None, device: torch.device) -> tuple[Step, dict]:
    """``--child VARIANT --finetune TASK``: the variant's step and its batch."""
    step = build_ft_variants([a.child], off, a.finetune, a.preset, a, device)[a.child]
    return step, make_ft_batch(FT_TASKS[a.finetune], *ft_setting(a.finetune, a), device)


def ft_tasks(a: argparse.Namespace) -> list[str]:
    names = list(FT_TASKS) if a.finetune == "all" else [t.strip() for t in a.finetune.split(",") if t.strip()]
    bad = [t for t in names if t not in FT_TASKS]
    if bad or not names:
        raise SystemExit(f"vs_official: --finetune {a.finetune!r}: tasks are {', '.join(FT_TASKS)} (or all)")
    return names


def run_finetune(a: argparse.Namespace, off: dict[str, Any] | None, device: torch.device,
                 log: Callable[[str], None], write_partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The fine-tuning section: per task, both steps warm up, then alternate round-robin in this
    process; then each variant's peak memory alone in a child process."""
    names = [n for n in a.variants.split(",") if n in ("official", "ours")]
    ft: dict[str, Any] = {"argv": sys.argv[1:], "preset": a.preset,
                          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "machine": machine_line(device), "device": device.type, "tasks": {}, "notes": list(a.ft_note),
                          "settings": {k: getattr(a, k) for k in ("threads", "warmup", "steps", "child_steps")}}
    load0 = os.getloadavg()
    for name in ft_tasks(a):
        task = FT_TASKS[name]
        size, batch = ft_setting(name, a)
        log(f"== fine-tuning {name}: {task.label}, {preset_label(a.preset)}, {size} px, batch {batch}")
        steps = build_ft_variants(names, off, name, a.preset, a, device)
        x = make_ft_batch(task, size, batch, device)
        base = {"label": task.label, "size": size, "batch": batch, "official_size": task.size, "run": ft["date"],
                "load_at_start": os.getloadavg()[0],
                "official_batch": task.batch, "official_config": task.official_config, "config": task.config,
                "params": {n: sum(p.numel() for p in s.model.parameters()) for n, s in steps.items()}}

        def partial(times: dict[str, list[float]], cpu: dict[str, list[float]], name: str = name,
                    base: dict[str, Any] = base) -> None:
            ft["tasks"][name] = dict(base, times=times, cpu=cpu, partial=True,
                                     median=medians(times), cpu_median=medians(cpu))
            write_partial(ft)

        times, cpu = interleaved(steps, x, a, device, log, on_round=partial)
        r = dict(base, times=times, cpu=cpu, median=medians(times), cpu_median=medians(cpu))
        if a.profile:
            r["profile"] = {n: profile_ops(s, x, device, a.top) for n, s in steps.items()}
        del steps, x
        if not a.no_memory:
            r["memory"] = {n: ft_peak_memory(n, name, a) for n in names}
        ft["tasks"][name] = r
        write_partial(ft)
        log("  medians: " + ", ".join(f"{n} {m:.2f} s (CPU {r['cpu_median'][n]:.2f} s)" for n, m in r["median"].items()))
    load1 = os.getloadavg()
    ft["load_note"] = (f"Load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} CPUs.")
    ft["verdicts"] = ft_verdicts(ft)
    return ft


def ft_verdicts(ft: dict[str, Any]) -> list[str]:
    out = []
    for name, r in ft["tasks"].items():
        med, cpu, mem = r["median"], r.get("cpu_median") or {}, r.get("memory") or {}
        parts = []
        if "official" in med and "ours" in med:
            w, c = med["official"] / med["ours"], cpu["official"] / cpu["ours"]
            s = FT_TARGETS["speed"]
            parts.append(f"CPU seconds {c:.2f}x (target >= {s:.1f}x: {'met' if c >= s else 'NOT met'}); "
                         f"wall {w:.2f}x ({'met' if w >= s else 'NOT met'})")
        o, m = (mem.get("official") or {}).get("peak_rss_mb"), (mem.get("ours") or {}).get("peak_rss_mb")
        if o and m:
            parts.append(f"memory {m / o:.2f}x (target <= {FT_TARGETS['memory']:.1f}x: "
                         f"{'met' if m / o <= FT_TARGETS['memory'] else 'NOT met'})")
        else:
            parts.append("memory not measured")
        out.append(f"- {name} ({r['size']} px, batch {r['batch']}): " + "; ".join(parts))
    return out


def _ft_speed(ft: dict[str, Any]) -> list[str]:
    s = argparse.Namespace(**ft["settings"])
    lines = ["# Fine-tuning: this project vs the official MultiMAE fine-tuning code", "",
             f"Produced by `python benchmarks/vs_official.py {' '.join(ft['argv'])}` on {ft['date']}.", "",
             f"Machine: {ft['machine']}; torch {torch.__version__}, {s.threads} threads, device `{ft['device']}`. "
             + ft.get("load_note", ""), "",
             f"Setting: {preset_label(ft['preset'])}, patch 16, one fine-tuning step = forward over every token "
             "(no masking), task loss, backward, AdamW step with layer-wise lr decay, fp32. Official side: "
             "`MultiViT` from the shared checkout with its `PatchedInputAdapter`s and the task's official output "
             "adapter, its optimizer factory and `NativeScalerWithGradNormCount` (which measures the gradient "
             "norm; ours does too), the loss of the official script (cross-entropy ignoring 255; berHu on valid "
             "pixels; label-smoothed cross-entropy). Ours: the shipped `configs/finetune/*.yaml` of the task, "
             "`multimae.model.transfer.build_transfer_model`, the loss of `multimae.tasks.finetune.build_loss`, "
             "`train_step`. Mixup / cutmix off on both sides; inputs are synthetic tensors, depth input already "
             "standardised (both code bases standardise in the data pipeline / before the model). Every variant "
             f"warms up ({s.warmup} steps), then official and ours alternate round-robin in one process; medians "
             f"of {s.steps} steps. Peak memory: each variant alone in a child process ({s.child_steps} steps), "
             "`VmHWM` of the whole process.", "",
             "| task | official config | size, batch (official) | official CPU s | ours CPU s | speed-up CPU s | "
             "official wall s | ours wall s | speed-up wall |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in ft["tasks"].items():
        cm, med = r.get("cpu_median") or {}, r["median"]
        f = lambda d, n: f"{d[n]:.2f}" if n in d else "—"  # noqa: E731
        lines.append(f"| {name}: {r['label']} | `{r['official_config'].split('/')[-1]}` | {r['size']} px x {r['batch']} "
                     f"({r['official_size']} px x {r['official_batch']}) | {f(cm, 'official')} | {f(cm, 'ours')} | "
                     f"{ratio(cm.get('official'), cm.get('ours'))} | {f(med, 'official')} | {f(med, 'ours')} | "
                     f"{ratio(med.get('official'), med.get('ours'))} |")
    lines += ["", "All timed steps, CPU s / wall s: " + "; ".join(
        f"{name} {n}: " + ", ".join(f"{c:.2f}/{t:.2f}" for c, t in zip(r["cpu"][n], r["times"][n]))
        for name, r in ft["tasks"].items() for n in r["times"]), ""]
    return lines


def _ft_memory(ft: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if any(r.get("memory") for r in ft["tasks"].values()):
        lines += ["## Fine-tuning peak memory", "", "| task | variant | parameters | peak RSS (MB) | RSS after import (MB) | "
                  "RSS after build (MB) | vs official | step (MB) | step vs official |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in ft["tasks"].items():
            mem = r.get("memory") or {}
            lines += [f"| {name} | {n} | — | failed | | | | | |" if m is None else
                      f"| {name} | {n} | {r['params'].get(n, 0) / 1e6:.1f}M | {memory_cells(m, mem.get('official'))} |"
                      for n, m in mem.items()]
        lines.append("")
    return lines


def ft_markdown(ft: dict[str, Any]) -> list[str]:
    """The fine-tuning sections of the report."""
    lines = _ft_speed(ft) + _ft_memory(ft)
    lines += ["## Fine-tuning targets (ours >= 1.2x faster, <= 0.8x memory)", ""] + ft.get("verdicts", []) + [""]
    for name, r in ft["tasks"].items():
        for n, (total, ops) in (r.get("profile") or {}).items():
            lines += [f"## Profile: fine-tuning {name} {n}, one step, top ops by self CPU time", "",
                      f"Sum of all ops' self CPU time: {total:.2f} s (torch.profiler; overhead inflates it).", "",
                      "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
            lines += [f"| `{k}` | {sec:.3f} | {100 * sec / total:.1f}% | {c} |" for k, sec, c in ops]
            lines.append("")
    if ft.get("notes"):
        lines += ["## Fine-tuning notes", ""]
        for n in ft["notes"]:
            lines += [n, ""]
    return lines




def merge_ft(fts: list[dict[str, Any]]) -> dict[str, Any]:
    """One fine-tuning section from several runs: tasks of later runs replace earlier ones; the
    runs' commands, dates and load notes are all listed."""
    owner: dict[str, int] = {}
    for i, ft in enumerate(fts):
        owner.update({t: i for t in ft["tasks"]})
    used = [fts[i] for i in sorted(set(owner.values()))]
    for i, ft in enumerate(fts):  # only the tasks a run contributes
        fts[i] = dict(ft, tasks={t: r for t, r in ft["tasks"].items() if owner[t] == i})
    out = dict(fts[-1])
    out["tasks"] = {}
    for ft in fts:
        out["tasks"].update(ft["tasks"])
    if len(used) > 1:
        out["argv"] = [" ; ".join(" ".join(ft["argv"]) for ft in used)]
        out["date"] = " / ".join(dict.fromkeys(ft["date"] for ft in used))
        out["load_note"] = " ".join(f"Run of {ft['date']} ({', '.join(ft['tasks'])}): {ft.get('load_note', '(partial)')}"
                                    for ft in fts if ft["tasks"])
        out["notes"] = list(dict.fromkeys(n for ft in used for n in ft.get("notes", [])))
        if any(ft["settings"] != used[0]["settings"] for ft in used):
            out["notes"].append("The merged runs used different settings: " + "; ".join(str(ft["settings"]) for ft in used))
    out["verdicts"] = ft_verdicts(out)
    return out


def ft_render(paths: list[Path], a: argparse.Namespace, markdown: Render) -> int:
    """``--ft-render A.json B.json``: merge fine-tuning runs into --out (pretraining results kept)."""
    import json

    fts = [json.loads(p.read_text())["finetune"] for p in paths]
    prev = a.out.with_suffix(".json")
    res = read_json(prev)
    res["finetune"] = merge_ft(fts)
    if a.ft_note:
        res["finetune"]["notes"] = list(res["finetune"].get("notes", [])) + list(a.ft_note)
    write_results(a.out, res, markdown(res), print)
    print("\n".join(ft_markdown(res["finetune"])))
    return 0


def finetune_main(a: argparse.Namespace, off: dict[str, Any] | None, device: torch.device,
                  log: Callable[[str], None], markdown: Render) -> int:
    """``--finetune``: the fine-tuning section, merged into --out next to the pretraining results
    of its .json (kept as they are)."""
    res = read_json(a.out.with_suffix(".json") if a.out else None)

    def write_partial(ft: dict[str, Any]) -> None:
        if a.out:
            write_json(dict(res, finetune=ft), a.out.with_suffix(".partial.json"))

    res["finetune"] = run_finetune(a, off, device, log, write_partial)
    write_results(a.out, res, markdown(res), log)
    print("\n".join(ft_markdown(res["finetune"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vs_official_finetune.py TASKS [options]`` = ``vs_official.py --finetune TASKS [options]``."""
    import vs_official

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        return vs_official.main(["--help"])
    if not argv or argv[0].startswith("-"):
        print(f"usage: vs_official_finetune.py TASKS [vs_official.py options]; TASKS: {','.join(FT_TASKS)} or all",
              file=sys.stderr)
        return 2
    return vs_official.main(["--finetune", *argv])


if __name__ == "__main__":
    sys.exit(main())
