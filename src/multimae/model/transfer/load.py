"""Building a transfer model from an ``init``: scratch, or anything the one reader reads.

Sources and what is taken from them:

* ``None`` / ``"scratch"``: nothing (random init, the baseline).
* anything :func:`multimae.checkpoint.pretrained.read_pretrained` reads -- a pretraining or
  fine-tuning run / checkpoint directory of this library, a ``save_pretrained`` directory, a
  ``.safetensors`` weights file, an official MultiMAE ``.pth`` (pretraining or fine-tuned), a
  timm / MAE ViT, a transformers ViT / ViTMAE directory, a state dict: the encoder (the transfer
  model's encoder weights carry MultiMAE's names, so nothing is renamed), fitted by the one fit
  function :func:`multimae.checkpoint.convert.fit_state_dict`.
* the head: an official fine-tuning head of the model's kind (ConvNeXtAdapter / DPTOutputAdapter /
  LinearOutputAdapter; the only renames left here, :func:`_official_head`), or a fine-tuning
  run's head when it is exactly the model's; otherwise the head is fresh.

Every load returns the :class:`~multimae.checkpoint.convert.ConversionReport` that names each key
taken, dropped or left fresh; a checkpoint whose encoder does not fit (missing blocks, other
widths) is an error listing all offending keys. Nothing here unpickles objects.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor

from multimae.checkpoint.convert import (
    ConversionError, ConversionReport, ConvertedWeights, UnknownHeadCount, fit_error, fit_state_dict,
)
from multimae.model.config import ModelConfig
from multimae.model.transfer.model import TransferModel, TransferModelConfig

__all__ = ["build_transfer_model", "read_init"]

Init = str | os.PathLike | Mapping[str, Tensor] | ConvertedWeights | None

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


def _head_kind_of_adapter(keys: list[str]) -> str | None:
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


def _rename_head(task: str, keys: list[str], kind: str) -> dict[str, str]:
    out = {}
    for k in keys:
        for rx, fn in _HEAD_RULES[kind]:
            if m := rx.match(k):
                out[f"output_adapters.{task}.{k}"] = "head." + fn(m)
                break
    return out


def _pick_head(sd: Mapping[str, Tensor], kind: str, head_task: str | None) -> dict[str, str]:
    """The official output adapter to load as the model's head: its key renames (none: no head)."""
    want = "depth" if kind == "dense" else kind
    tasks: dict[str, list[str]] = {}
    for k in sd:
        if k.startswith("output_adapters."):
            _, task, rest = k.split(".", 2)
            tasks.setdefault(task, []).append(rest)
    fits = [t for t, ks in tasks.items() if _head_kind_of_adapter(ks) == want]
    if head_task is not None:
        if head_task not in tasks:
            raise ConversionError(f"head_task {head_task!r}: no output_adapters.{head_task}.* in the checkpoint "
                                  f"(it has {sorted(tasks)})")
        if head_task not in fits:
            raise ConversionError(f"output_adapters.{head_task} is not a {want} head")
        fits = [head_task]
    if len(fits) > 1:
        raise ConversionError(f"the checkpoint has several {want} heads {fits}; choose one with head_task")
    return _rename_head(fits[0], tasks[fits[0]], want) if fits else {}


def _official_head(weights: ConvertedWeights, model: TransferModel, head_task: str | None) -> bool:
    """Rename an official head of the model's kind to ``head.*`` in ``weights`` (its keys the
    model has no place for are dropped; modules registered under two names -- the DPT adapter's
    ``act_<i>_postprocess`` / ``act_postprocess.<i-1>``, ``scratch.layer<i>_rn`` /
    ``scratch.layer_rn.<i-1>`` -- must hold equal tensors and load once). True if one was found."""
    sd, report = weights.state_dict, weights.report
    renames = _pick_head(sd, model.config.head.kind, head_task)
    own = model.state_dict()
    dupes = []
    for k, target in renames.items():
        v = sd.pop(k)
        if target not in own:
            report.dropped[k] = "no place in the model's head"
        elif target in sd:
            if not torch.equal(sd[target], v.to(sd[target].dtype)):
                dupes.append(f"{report.mapped[target]} and {k} (both {target}) differ")
            report.aliases.append(k)
        else:
            sd[target] = v
            report.mapped[target] = k
    report.aliases.sort()
    err = fit_error(report.source, "the transfer model", dupes=dupes)
    if err is not None:
        raise err
    return bool(renames)


def _own_head(weights: ConvertedWeights, model: TransferModel) -> bool:
    """A fine-tuning run's head loads when it is the model's head exactly (same keys and shapes);
    otherwise it is dropped (fine-tuning on another task). True if it loads."""
    sd, own = weights.state_dict, model.state_dict()
    ck = {k for k in sd if k.startswith("head.")}
    if not ck:
        return False
    if ck == {k for k in own if k.startswith("head.")} and all(tuple(sd[k].shape) == tuple(own[k].shape) for k in ck):
        return True
    for k in sorted(ck):
        sd.pop(k)
        weights.report.dropped[k] = "head of another task (the model's head is fresh)"
    return False


def _check_arch(cfg_enc: ModelConfig, recorded: ModelConfig, source: str) -> None:
    """Head counts and MLP ratio do not show in every shape: compare with the checkpoint's config."""
    a, b = cfg_enc.resolved(), recorded.resolved()
    diff = [f"{f}: config {getattr(a, f)} vs checkpoint {getattr(b, f)}"
            for f in ("dim", "depth", "num_heads", "patch_size", "num_global_tokens")
            if getattr(a, f) != getattr(b, f)]
    if diff:
        arch = ", ".join(f"{f}: {getattr(b, f)}" for f in ("dim", "depth", "num_heads", "patch_size", "image_size"))
        raise ConversionError(f"{source}: encoder architecture differs from the checkpoint's -- " + "; ".join(diff)
                              + f". To take the checkpoint's ({{{arch}}}) instead of the config's, set "
                              "model.encoder=null")


def read_init(init: str | os.PathLike | Mapping[str, Tensor], num_heads: int | None = None) -> ConvertedWeights:
    """``init`` read by the one reader as an encoder (decoders not part of its config; their
    tensors, and official heads, kept for the fit). A non-standard width without a head count is
    an error that names the ``model.encoder`` setting to give."""
    from multimae.checkpoint.pretrained import read_pretrained

    try:
        return read_pretrained(init, num_heads_hint=num_heads, outputs=[])
    except UnknownHeadCount as e:
        a = e.arch
        raise ConversionError(f"{e}; or give the encoder with its head count H: model.encoder={{dim: {a.get('dim')}, "
                              f"depth: {a.get('depth')}, num_heads: H, patch_size: {a.get('patch_size')}}}") from None


def build_transfer_model(cfg: TransferModelConfig, init: Init = None, head_task: str | None = None,
                         num_heads: int | None = None) -> tuple[TransferModel, ConversionReport]:
    """Build a :class:`TransferModel` and initialise it from ``init``; returns it with the report.

    init: ``None`` / ``"scratch"``; a run or checkpoint directory of this library (pretraining:
        the encoder is copied exactly; fine-tuning: the encoder, and the head when it is the
        model's); a ``save_pretrained`` directory; a ``.safetensors`` weights file; an official
        MultiMAE ``.pth`` (pretraining or fine-tuned); a timm / MAE ViT; a transformers
        directory; a state dict; or weights already read (:func:`read_init`).
    ``cfg.encoder = None`` takes the encoder architecture from ``init`` (the run's config, or the
    official tensors' shapes; ``num_heads``, not stored in weights, is then the standard ViT's of
    that width or must be given). ``head_task`` chooses among several official heads of the model's kind.
    To rebuild a saved fine-tuning run exactly, build ``TransferModel(saved cfg)`` and load its
    weights strictly (:func:`multimae.checkpoint.convert.load_state_strict`), or pass the run as
    ``init`` here (its head loads when the config's head is the same).
    """
    if init is None or (isinstance(init, str) and init == "scratch"):
        if cfg.encoder is None:
            raise ValueError("init=scratch needs model.encoder (an architecture, e.g. {preset: nano})")
        model = TransferModel(cfg)
        report = ConversionReport("scratch", "scratch", new_inputs=list(cfg.inputs),
                                  added={k: "scratch (freshly initialised)" for k in model.state_dict()})
        return model, report
    heads = cfg.encoder.num_heads if cfg.encoder is not None else num_heads
    weights = init if isinstance(init, ConvertedWeights) else read_init(init, heads)
    if cfg.encoder is None:
        cfg = replace(cfg, encoder=weights.config)
    else:
        _check_arch(cfg.encoder, weights.config, weights.report.source)
    model = TransferModel(cfg)
    if not (_own_head(weights, model) or _official_head(weights, model, head_task)):
        weights.fresh = (*weights.fresh, "head.")
    fit_state_dict(model, weights, drop_unexpected=True)
    return model, weights.report
