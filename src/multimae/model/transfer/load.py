"""Building a transfer model from an ``init``: scratch, a run of this library, or an official checkpoint.

Sources and what is taken from them:

* ``None`` / ``"scratch"``: nothing (random init, the baseline).
* a pretraining run / checkpoint directory of this library, its ``model.safetensors``, an
  official MultiMAE pretraining ``.pth``, or an official fine-tuned ``.pth`` / state dict (all in
  the MultiMAE layout: ``input_adapters.*``, ``global_tokens``, ``encoder.<i>.*``,
  ``output_adapters.*``): the encoder, and a head when the file holds an official head of the
  model's kind; through the ONE filter :func:`filter_multimae_state_dict`.
* a fine-tuning run of this library (transfer layout: ``encoder.blocks.*``, ``head.*``): the
  encoder, and the head when it is exactly the model's (else the head is fresh: another task),
  through the same filter.

Every load returns a :class:`LoadReport` that names each key taken, dropped or left fresh; a
checkpoint whose encoder does not fit (missing blocks, other widths) is an error listing all
offending keys. Nothing here unpickles objects (safetensors, or ``torch.load(weights_only=True)``
through :func:`multimae.checkpoint.convert.read_state_dict`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from multimae.checkpoint import load_meta, load_weights, resolve_checkpoint
from multimae.checkpoint.convert import (
    KNOWN_HEADS, ConversionError, fit_error, infer_official_config, model_config, read_state_dict,
)
from multimae.checkpoint.hf import hf_config
from multimae.checkpoint.io import META_FILE, WEIGHTS_FILE
from multimae.checkpoint.resize import resize_pos_table
from multimae.checkpoint.vit import is_vit_layout, load_hf_vit, vit_to_multimae
from multimae.core.config import from_dict
from multimae.model.multimae import ModelConfig
from multimae.model.transfer.model import TransferModel, TransferModelConfig

__all__ = ["LoadReport", "build_transfer_model", "filter_multimae_state_dict", "head_kind_of_adapter"]


@dataclass
class LoadReport:
    """What an ``init`` gave a transfer model (all lists are model parameter/buffer names,
    except ``dropped``, which holds the checkpoint's own names).

    source: description of the init ("scratch", a path, "state_dict").
    loaded: model keys copied from the checkpoint.
    new_inputs: input modalities that got a fresh input projection (no pretrained one).
    dropped: checkpoint keys not used (pretraining decoders, heads of another kind, input
        adapters of modalities that are not inputs now).
    missing: model keys left at their initialisation (the head, fresh input adapters).
    aliases: checkpoint keys that are a second name of a loaded tensor (the official DPT head
        registers its reassemble and projection layers twice); checked equal, loaded once.
    resized: position tables built for another grid, "key: how" (sine-cosine tables regenerated
        in their layout, learned ones resampled; :mod:`multimae.checkpoint.resize`).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    new_inputs: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log."""
        heads = sorted({k.split(".")[0] for k in self.missing})
        return (f"init {self.source}: {len(self.loaded)} tensors loaded, {len(self.dropped)} dropped, "
                f"{len(self.missing)} fresh ({', '.join(heads) or 'none'})"
                + (f"; new input projections: {', '.join(self.new_inputs)}" if self.new_inputs else ""))


# --------------------------------------------------------------------------------------------
# Official / MultiMAE-layout state dicts
# --------------------------------------------------------------------------------------------

_DPT_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^act_(\d)_postprocess\.(.*)$"), lambda m: f"reassemble.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^act_postprocess\.(\d)\.(.*)$"), lambda m: f"reassemble.{m[1]}.{m[2]}"),
    (re.compile(r"^scratch\.layer(\d)_rn\.(.*)$"), lambda m: f"project.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^scratch\.layer_rn\.(\d)\.(.*)$"), lambda m: f"project.{m[1]}.{m[2]}"),
    (re.compile(r"^scratch\.refinenet(\d)\.resConfUnit(\d)\.(.*)$"),
     lambda m: f"fusion.{int(m[1]) - 1}.res{m[2]}.{m[3]}"),
    (re.compile(r"^scratch\.refinenet(\d)\.out_conv\.(.*)$"), lambda m: f"fusion.{int(m[1]) - 1}.out_conv.{m[2]}"),
    (re.compile(r"^head\.(.*)$"), lambda m: f"output.{m[1]}"),
]
_SEG_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^proj_dec\.(.*)$"), lambda m: f"proj.{m[1]}"),
    (re.compile(r"^blocks\.(\d+)\.dwconv\.(.*)$"), lambda m: f"convnext.{m[1]}.conv_dw.{m[2]}"),
    (re.compile(r"^blocks\.(\d+)\.norm\.(.*)$"), lambda m: f"convnext.{m[1]}.norm.{m[2]}"),
    (re.compile(r"^blocks\.(\d+)\.pwconv(\d)\.(.*)$"), lambda m: f"convnext.{m[1]}.mlp.fc{m[2]}.{m[3]}"),
    (re.compile(r"^blocks\.(\d+)\.gamma$"), lambda m: f"convnext.{m[1]}.gamma"),
    (re.compile(r"^final_layer\.(.*)$"), lambda m: f"classifier.{m[1]}"),
]
_CLS_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^norm\.(.*)$"), lambda m: f"norm.{m[1]}"),
    (re.compile(r"^head\.(.*)$"), lambda m: f"fc.{m[1]}"),
]
_HEAD_RULES = {"segmentation": _SEG_RULES, "depth": _DPT_RULES, "classification": _CLS_RULES}


def head_kind_of_adapter(keys: list[str]) -> str | None:
    """Kind of an official output adapter from its key names (without the
    ``output_adapters.<task>.`` prefix): ``segmentation`` (ConvNeXtAdapter), ``depth``
    (DPTOutputAdapter), ``classification`` (LinearOutputAdapter) or None (a pretraining decoder
    or an adapter this library has no head for)."""
    ks = set(keys)
    if any(k.startswith("proj_dec.") for k in ks) and any(k.startswith("final_layer.") for k in ks):
        return "segmentation"
    if any(k.startswith("scratch.") for k in ks):
        return "depth"
    if ks and all(k.split(".")[0] in ("norm", "head") for k in ks):
        return "classification"
    return None


def _rename_encoder_key(k: str) -> str | None:
    if k == "global_tokens":
        return "encoder.global_tokens"
    if k.startswith("encoder_norm."):
        return "encoder.norm." + k[len("encoder_norm."):]
    if k.startswith("input_adapters."):
        return "encoder." + k
    m = re.match(r"^encoder\.(\d+)\.(.*)$", k)
    if m:
        return f"encoder.blocks.{m[1]}.{m[2]}"
    return None


def _rename_head(task: str, keys: list[str], kind: str) -> dict[str, str]:
    out = {}
    for k in keys:
        for rx, fn in _HEAD_RULES[kind]:
            m = rx.match(k)
            if m:
                out[f"output_adapters.{task}.{k}"] = "head." + fn(m)
                break
    return out


def _pick_head(sd: Mapping[str, Tensor], kind: str, head_task: str | None) -> tuple[str | None, dict[str, str]]:
    """The official output adapter to load as the model's head, and its key renames."""
    want = "depth" if kind == "dense" else kind
    tasks: dict[str, list[str]] = {}
    for k in sd:
        if k.startswith("output_adapters."):
            _, task, rest = k.split(".", 2)
            tasks.setdefault(task, []).append(rest)
    fits = [t for t, ks in tasks.items() if head_kind_of_adapter(ks) == want]
    if head_task is not None:
        if head_task not in tasks:
            raise ConversionError(f"head_task {head_task!r}: no output_adapters.{head_task}.* in the checkpoint "
                                  f"(it has {sorted(tasks)})")
        if head_task not in fits:
            raise ConversionError(f"output_adapters.{head_task} is not a {want} head")
        fits = [head_task]
    if len(fits) > 1:
        raise ConversionError(f"the checkpoint has several {want} heads {fits}; choose one with head_task")
    if not fits:
        return None, {}
    return fits[0], _rename_head(fits[0], tasks[fits[0]], want)


def _transfer_head_map(sd: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, str]:
    """A transfer-layout checkpoint's head loads when it is the model's head exactly (same keys
    and shapes); otherwise the model's head stays fresh and the checkpoint's is dropped."""
    ck = {k for k in sd if k.startswith("head.")}
    if ck != {k for k in own if k.startswith("head.")}:
        return {}
    if any(tuple(sd[k].shape) != tuple(own[k].shape) for k in ck):
        return {}
    return {k: k for k in ck}


def filter_multimae_state_dict(sd: Mapping[str, Tensor], model: TransferModel, source: str = "state_dict",
                               head_task: str | None = None) -> tuple[dict[str, Tensor], LoadReport]:
    """Map a MultiMAE-layout state dict (official pretraining or fine-tuned, or this library's
    pretraining) or a transfer-layout one (this library's fine-tuning runs) onto ``model``'s
    keys, with an exact report.

    Renames ``input_adapters.*`` / ``global_tokens`` / ``encoder.<i>.*`` into ``encoder.*`` and an
    official head of the model's kind (ConvNeXtAdapter / DPTOutputAdapter / LinearOutputAdapter;
    ``head_task`` picks one by task name when several fit) into ``head.*``. The DPT adapter's
    modules registered under two names (``act_<i>_postprocess`` / ``act_postprocess.<i-1>``,
    ``scratch.layer<i>_rn`` / ``scratch.layer_rn.<i-1>``) must hold equal tensors; they load once.
    Position tables built for another grid are regenerated (sine-cosine) or resampled (learned).
    ``encoder_norm.*`` (a final norm, MAE / timm encoders) -> ``encoder.norm.*``.
    A transfer-layout checkpoint's head loads only if it is exactly the model's head (same keys and
    shapes), else it is dropped and the model's head stays fresh (fine-tuning on another task).

    Raises :class:`ConversionError` listing every missing encoder key (other than fresh input
    modalities), shape mismatch, and disagreeing duplicate.
    """
    own = model.state_dict()
    inputs = list(model.encoder.specs)
    transfer = _is_transfer_layout(sd)
    pre = "encoder.input_adapters." if transfer else "input_adapters."
    new_inputs = [n for n in inputs if not any(k.startswith(f"{pre}{n}.") and not k.endswith("pos_emb") for k in sd)]
    if transfer:
        head_map = _transfer_head_map(sd, own)
        head_src = "head" if head_map else None
        rename = lambda k: k if k.startswith("encoder.") else None  # noqa: E731
    else:
        head_src, head_map = _pick_head(sd, model.config.head.kind, head_task)
        rename = _rename_encoder_key
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped, shapes, dupes, aliases, resized = [], [], [], [], []
    for k, v in sd.items():
        target = rename(k) or head_map.get(k)
        if target is None or target not in own:
            dropped.append(k)
            continue
        if tuple(v.shape) != tuple(own[target].shape):
            if target.endswith(".pos_emb") and v.ndim == 4 and v.shape[:2] == own[target].shape[:2]:
                # a table for another grid: sine-cosine regenerated, learned resampled
                mode = getattr(model.encoder.input_adapters[target.split(".")[2]], "pos_mode", "bicubic")
                v, how = resize_pos_table(v, tuple(own[target].shape[-2:]), mode)
                resized.append(f"{k}: {how}")
            else:
                shapes.append(f"{k} -> {target}: checkpoint {tuple(v.shape)} vs model {tuple(own[target].shape)}")
                continue
        if target in out:
            if not torch.equal(out[target], v.to(out[target].dtype)):
                dupes.append(f"{origin[target]} and {k} (both {target}) differ")
            aliases.append(k)
            continue
        out[target] = v.to(own[target].dtype) if v.is_floating_point() else v
        origin[target] = k
    if not any(t.startswith("encoder.blocks.") for t in out) and not shapes:
        raise ConversionError(f"{source}: no encoder block found (first keys {sorted(sd)[:6]}); expected a MultiMAE, "
                              "transfer-model, timm or MAE state dict")
    fresh_prefixes = tuple(f"encoder.input_adapters.{n}." for n in new_inputs) + ("head.",)
    missing = [k for k in own if k not in out]
    bad_missing = [k for k in missing if not k.startswith(fresh_prefixes)]
    if head_src is not None:
        bad_missing += [k for k in missing if k.startswith("head.")]
    err = fit_error(source, "the transfer model", missing=bad_missing, shapes=shapes, dupes=dupes)
    if err is not None:
        raise err
    report = LoadReport(source, loaded=sorted(out), new_inputs=new_inputs, dropped=sorted(dropped),
                        missing=sorted(missing), aliases=sorted(aliases), resized=resized)
    return out, report


def _is_transfer_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("encoder.blocks.") for k in sd) and any(k.startswith("head.") for k in sd)


# --------------------------------------------------------------------------------------------
# Encoder architecture from an init
# --------------------------------------------------------------------------------------------

def _encoder_from_meta(meta: dict[str, Any], source: str) -> ModelConfig | None:
    model = (meta.get("config") or {}).get("model")
    if not isinstance(model, dict):
        return None
    if "head" in model:  # a fine-tuning run: model = TransferModelConfig
        if not isinstance(model.get("encoder"), dict):
            return None
        model = model["encoder"]
    try:
        return from_dict(ModelConfig, model)
    except ValueError as e:
        raise ConversionError(f"{source}: cannot read the encoder config from meta.json ({e})") from e


def _read_files(init: str | os.PathLike | Mapping[str, Tensor], num_heads: int | None = None
                ) -> tuple[dict[str, Tensor], ModelConfig | None, str]:
    if isinstance(init, Mapping):
        return dict(init), None, "state_dict"
    p = Path(init)
    if not p.exists():
        raise FileNotFoundError(f"init {p} does not exist (expected 'scratch', a run or checkpoint directory, "
                                f"a save_pretrained directory, a .safetensors, an official / MAE / timm .pth or "
                                f"a transformers ViT / ViTMAE directory)")
    if p.is_dir() and hf_config(p) is not None:
        fields, sd, _, _ = load_hf_vit(p, num_heads)
        return sd, model_config(fields), str(p)
    if p.is_file() and p.name == WEIGHTS_FILE and ((p.parent / META_FILE).is_file() or (p.parent / "config.json").is_file()):
        p = p.parent
    if p.is_dir() and not (p / META_FILE).is_file() and (p / "config.json").is_file() and (p / WEIGHTS_FILE).is_file():
        try:  # a save_pretrained directory: config.json {"model": ModelConfig}
            model = json.loads((p / "config.json").read_text(encoding="utf-8")).get("model")
            recorded = from_dict(ModelConfig, model) if isinstance(model, dict) else None
        except (OSError, ValueError, AttributeError) as e:
            raise ConversionError(f"{p / 'config.json'}: cannot read the model config ({e})") from e
        return load_weights(p / WEIGHTS_FILE), recorded, str(p)
    if p.is_dir():
        ckpt = resolve_checkpoint(p)
        return load_weights(ckpt), _encoder_from_meta(load_meta(ckpt), str(ckpt)), str(ckpt)
    return read_state_dict(p), None, str(p)


def _read_init(init: str | os.PathLike | Mapping[str, Tensor], num_heads: int | None = None
               ) -> tuple[dict[str, Tensor], ModelConfig | None, str]:
    """(state dict in MultiMAE or transfer names, encoder config if known, description).

    A DDP ``module.`` prefix is removed; a timm / facebookresearch-mae ViT is mapped onto an rgb
    MultiMAE encoder (:func:`multimae.checkpoint.vit.vit_to_multimae`)."""
    from multimae.checkpoint.pretrained import recorded_num_heads

    sd, recorded, source = _read_files(init, num_heads)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if is_vit_layout(sd):
        if num_heads is None and not isinstance(init, Mapping):  # `multimae convert --to timm` records it
            num_heads = recorded_num_heads(init)
        w = sd.get("patch_embed.proj.weight")
        if num_heads is None and w is not None and int(w.shape[0]) not in KNOWN_HEADS:
            depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
            raise ConversionError(
                f"{source}: width {w.shape[0]} is not a standard ViT's and the weights do not record the head count; "
                f"give the encoder with its head count H: model.encoder={{dim: {w.shape[0]}, depth: {depth}, "
                f"num_heads: H, patch_size: {w.shape[-1]}}}")
        fields, sd, _, _ = vit_to_multimae(sd, source, num_heads)
        recorded = recorded or model_config(fields)
    return sd, recorded, source


def _check_arch(cfg_enc: ModelConfig, recorded: ModelConfig | None, source: str) -> None:
    """Head counts and MLP ratio do not show in every shape: compare with the recorded config."""
    if recorded is None:
        return
    a, b = cfg_enc.resolved(), recorded.resolved()
    diff = [f"{f}: config {getattr(a, f)} vs checkpoint {getattr(b, f)}"
            for f in ("dim", "depth", "num_heads", "patch_size", "num_global_tokens")
            if getattr(a, f) != getattr(b, f)]
    if diff:
        arch = ", ".join(f"{f}: {getattr(b, f)}" for f in ("dim", "depth", "num_heads", "patch_size", "image_size"))
        raise ConversionError(f"{source}: encoder architecture differs from the checkpoint's -- " + "; ".join(diff)
                              + f". To take the checkpoint's ({{{arch}}}) instead of the config's, set "
                              "model.encoder=null")


def build_transfer_model(cfg: TransferModelConfig, init: str | os.PathLike | Mapping[str, Tensor] | None = None,
                         head_task: str | None = None, num_heads: int | None = None
                         ) -> tuple[TransferModel, LoadReport]:
    """Build a :class:`TransferModel` and initialise it from ``init``.

    init: ``None`` / ``"scratch"``; a run or checkpoint directory of this library (pretraining:
        the encoder is copied exactly; fine-tuning: the encoder, and the head when it is the
        model's); a ``save_pretrained`` directory; a ``.safetensors`` weights file; an official
        MultiMAE ``.pth`` (pretraining or fine-tuned); a timm / MAE ViT; or a state dict.
    ``cfg.encoder = None`` takes the encoder architecture from ``init`` (the run's config, or the
    official tensors' shapes; ``num_heads``, not stored in weights, is then the standard ViT's of
    that width or must be given). ``head_task`` chooses among several official heads of the model's kind.
    """
    if init is None or (isinstance(init, str) and init == "scratch"):
        if cfg.encoder is None:
            raise ValueError("init=scratch needs model.encoder (an architecture, e.g. {preset: nano})")
        model = TransferModel(cfg)
        return model, LoadReport("scratch", new_inputs=list(cfg.inputs), missing=sorted(model.state_dict()))
    heads = cfg.encoder.num_heads if cfg.encoder is not None else num_heads
    sd, recorded, source = _read_init(init, heads)
    transfer_layout = _is_transfer_layout(sd)
    if cfg.encoder is None:
        if recorded is None:
            if transfer_layout:
                raise ConversionError(f"{source}: a transfer-model state dict without a config; set model.encoder")
            enc_sd = {k: v for k, v in sd.items() if not k.startswith("output_adapters.")}
            recorded = infer_official_config(enc_sd, heads)
        cfg = replace(cfg, encoder=recorded)
    else:
        _check_arch(cfg.encoder, recorded, source)
    model = TransferModel(cfg)
    weights, report = filter_multimae_state_dict(sd, model, source, head_task)
    model.load_state_dict(weights, strict=False)
    return model, report
