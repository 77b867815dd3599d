"""Hugging Face ``transformers`` ViT and ViTMAE directories, in and out.

In: a directory holding ``config.json`` (``model_type`` ``vit_mae`` or ``vit``) and
``model.safetensors`` (or sharded ``model-*.safetensors`` with their index, or
``pytorch_model.bin``), as ``save_pretrained`` of ``ViTMAEForPreTraining``, ``ViTMAEModel``,
``ViTModel`` or ``ViTForImageClassification`` writes it (e.g. facebook/vit-mae-base saved
locally). Head count, LayerNorm eps, patch and image size come from ``config.json``; the weights
are renamed to the timm layout and mapped onto an rgb MultiMAE encoder by
:func:`multimae.checkpoint.vit.vit_to_multimae` (class token -> global token, final
``layernorm`` -> ``encoder_norm``). ViTMAE's decoder, ViT's pooler and classifier are reported
unused.

This module only renames (it imports nothing of the model, so the checkpoint layer gains no
import circle); :func:`multimae.checkpoint.vit.load_hf_vit` and
:func:`multimae.checkpoint.vit.to_transformers_vitmae` are the loaders built on it.

Out: :func:`multimae.checkpoint.vit.to_transformers_vitmae` writes a ``ViTMAEModel`` directory
(``transformers.ViTMAEModel.from_pretrained(dir)`` loads it with no missing key); like the timm
export, a MultiMAE encoder without a final norm gets an identity-affine ``layernorm``.
``ViTMAEModel`` shuffles the patches by random noise even at ``mask_ratio`` 0 (written as 0.0):
pass ``noise=torch.arange(N).expand(B, N)`` to keep their order.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from multimae.checkpoint.io import CheckpointError

HF_MODEL_TYPES = ("vit_mae", "vit")
CONFIG = "config.json"
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # transformers ViT layer -> timm block
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def hf_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a transformers ViT / ViTMAE directory, or None for anything else."""
    f = Path(path) / CONFIG
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("model_type") in HF_MODEL_TYPES else None


def weight_files(d: Path) -> list[Path]:
    """The weight files of a transformers directory (one, or the shards of an index)."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [d / name for name in files]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]  # read weights_only: tensors, never code
    raise CheckpointError(f"{d}: a transformers {hf_config(d)['model_type']} directory without weights "  # type: ignore[index]
                          "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def hf_to_timm(sd: Mapping[str, Tensor], cfg: Mapping[str, Any], source: str
               ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """transformers ViT / ViTMAE names -> timm names; returns (state dict, dropped key -> why)."""
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    out: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    qkv: dict[int, dict[str, dict[str, Tensor]]] = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            dropped[key] = ("ViTMAE decoder (unused: MultiMAE decoders are per-task cross-attention decoders)"
                            if key.startswith("decoder.") else "classification head (unused)"
                            if key.startswith("classifier.") else "not part of the encoder")
            continue
        k = key[len(prefix):]
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("pooler."):
            dropped[key] = "pooler (unused)"
        elif k == "embeddings.mask_token":
            dropped[key] = "mask token of ViT's masked-image-modelling variant (unused)"
        elif (m := _LAYER.match(k)) is not None:
            i, rest = int(m[1]), m[2]
            qm = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault(i, {}).setdefault(qm[2], {})[qm[1]] = v
                continue
            name, _, param = rest.rpartition(".")
            if name not in _LAYER_NAMES:
                raise CheckpointError(f"{source}: key {key!r} has no place in a ViT block (not supported)")
            out[f"blocks.{i}.{_LAYER_NAMES[name]}.{param}"] = v
        else:
            raise CheckpointError(f"{source}: key {key!r} has no place in a MultiMAE encoder")
    for i, parts in qkv.items():
        w = parts.get("weight", {})
        if set(w) != {"query", "key", "value"}:
            raise CheckpointError(f"{source}: layer {i} lacks one of query/key/value weights")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([w["query"], w["key"], w["value"]], 0)
        b = parts.get("bias")
        if b is not None and set(b) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([b["query"], b["key"], b["value"]], 0)
        else:  # qkv_bias=False: a zero bias is the same function
            out[f"blocks.{i}.attn.qkv.bias"] = w["query"].new_zeros(3 * w["query"].shape[0])
    return out, dropped


def hf_fields(cfg: Mapping[str, Any], fields: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields read off the weights, completed and checked with ``config.json``."""
    fields = dict(fields)
    fields["norm_eps"] = float(cfg.get("layer_norm_eps", 1e-12))
    if "intermediate_size" in cfg:
        fields["mlp_ratio"] = int(cfg["intermediate_size"]) / int(cfg.get("hidden_size", fields["dim"]))
    for name, ours in (("hidden_size", fields["dim"]), ("num_hidden_layers", fields["depth"]),
                       ("patch_size", fields["patch_size"]), ("image_size", fields["image_size"])):
        if name in cfg and int(cfg[name]) != int(ours):
            raise CheckpointError(f"{where}: {name} {cfg[name]} disagrees with the weights ({ours})")
    return fields


def check_hf_config(cfg: Mapping[str, Any], where: str, num_heads: int | None) -> int:
    """Refuse what the MultiMAE encoder is not (another activation, other channels); the head count."""
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (the MultiMAE encoder uses exact GELU)")
    if int(cfg.get("num_channels", 3)) != 3:
        raise CheckpointError(f"{where}: num_channels {cfg.get('num_channels')}: the rgb input takes 3")
    heads = num_heads if num_heads is not None else cfg.get("num_attention_heads")
    if heads is None:
        raise CheckpointError(f"{where}: no num_attention_heads; pass num_heads=")
    return int(heads)


def timm_to_hf(sd: Mapping[str, Tensor], dim: int) -> dict[str, Tensor]:
    """timm ViT names (:func:`multimae.checkpoint.vit.to_timm_state_dict`) -> transformers ViTMAEModel names."""
    out: dict[str, Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            continue
        i, name, param = m[1], m[2], m[3]
        if name == "attn.qkv":
            for j, part in enumerate(("query", "key", "value")):
                out[f"encoder.layer.{i}.attention.attention.{part}.{param}"] = v[j * dim:(j + 1) * dim]
        else:
            out[f"encoder.layer.{i}.{inverse[name]}.{param}"] = v
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def vitmae_config(dim: int, depth: int, heads: int, mlp_ratio: float, norm_eps: float, image_size: int,
                  patch_size: int, channels: int) -> dict[str, Any]:
    """The ``config.json`` of a transformers ViTMAEModel of that architecture (mask ratio 0)."""
    return {
        "model_type": "vit_mae", "architectures": ["ViTMAEModel"],
        "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
        "intermediate_size": int(round(mlp_ratio * dim)), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": norm_eps, "image_size": image_size, "patch_size": patch_size,
        "num_channels": channels, "qkv_bias": True, "mask_ratio": 0.0, "norm_pix_loss": False,
    }
