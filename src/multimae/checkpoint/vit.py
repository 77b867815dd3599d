"""ViT weights in the timm layout, in and out: timm ``VisionTransformer`` and facebookresearch/mae.

Both use one set of names: ``patch_embed.proj.*``, ``cls_token`` (1, 1, D), ``pos_embed``
(1, 1 + N, D) with the class position first, ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}.*``, ``norm.*`` and, in timm, ``head.*`` / ``fc_norm.*``; MAE pretraining checkpoints
add a decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.*``,
``decoder_norm``, ``decoder_pred``) in their ``_full`` variants.

Mapping onto a MultiMAE rgb encoder (one global token):

* ``patch_embed.proj`` -> ``input_adapters.rgb.proj``; ``blocks.<i>`` -> ``encoder.<i>``;
* ``pos_embed[:, 1:]`` -> ``input_adapters.rgb.pos_emb`` as a (1, D, h, w) table (MAE's fixed
  sine-cosine table is kept as it is; at another image size it is regenerated, a learned timm
  table resampled, see :mod:`.resize`);
* ``cls_token + pos_embed[:, :1]`` -> ``global_tokens``: the class token becomes the global token
  with its position folded in (MultiMAE's global token has no position; attention does not
  depend on token order, so the tokens come out equal, the global one last instead of first);
* ``norm`` -> ``encoder_norm`` (:attr:`ModelConfig.encoder_norm` = True). MultiMAE has no final
  norm; keeping MAE's / timm's makes the encoder's tokens equal to their ``forward_features``
  and the export back lossless. ``encoder_norm=False`` on load drops it (reported);
* ``head.*``, ``fc_norm.*`` and the MAE decoder are reported as unused.

Export (:func:`to_timm_state_dict`) is the inverse; the class position is exported as zeros, and
a model without ``encoder_norm`` gets an identity-affine ``norm`` (weight 1, bias 0), so timm's
``forward_features`` equals LayerNorm(our tokens) and its blocks' output equals our tokens.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from multimae.checkpoint import hf
from multimae.checkpoint.convert import ConversionError, ConversionReport, default_heads, read_state_dict
from multimae.checkpoint.resize import resize_pos_table, sincos_layout
from multimae.core.io import save_file_atomic

#: (dim, depth, heads, patch size) -> timm model name, for ``timm.create_model(name, pretrained=False,
#: num_classes=0)``; ViT-Ti/S/B/L are the presets tiny/small/base/large with 16 px patches, ViT-H/14
#: is ``preset=large, dim=1280, depth=32, num_heads=16, patch_size=14``
TIMM_NAMES: dict[tuple[int, int, int, int], str] = {
    (192, 12, 3, 16): "vit_tiny_patch16_224",
    (384, 12, 6, 16): "vit_small_patch16_224",
    (768, 12, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16, 16): "vit_large_patch16_224",
    (1280, 32, 16, 14): "vit_huge_patch14_224",
}
MAE_DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                        "decoder_pred.")
_UNUSED = {**dict.fromkeys(MAE_DECODER_PREFIXES, "MAE decoder (unused: MultiMAE decoders are per-task cross-attention "
                                                  "decoders)"),
           "head.": "classification head (unused)", "fc_norm.": "pooled-feature norm of a timm/MAE classifier (unused)",
           "head_drop": "dropout (no weights)"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def is_vit_layout(sd: Mapping[str, Tensor]) -> bool:
    """True for a timm / MAE ViT state dict."""
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)


def is_mae(sd: Mapping[str, Tensor]) -> bool:
    """A facebookresearch/mae checkpoint: a MAE decoder, or a fixed MAE sine-cosine ``pos_embed``
    with a zero class position."""
    if any(k.startswith(MAE_DECODER_PREFIXES) for k in sd):
        return True
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3 or "cls_token" not in sd:
        return False
    g = math.isqrt(pos.shape[1] - 1)
    if g * g != pos.shape[1] - 1 or bool(pos[0, 0].abs().max() > 0):
        return False
    return sincos_layout(pos[:, 1:].transpose(1, 2).reshape(1, -1, g, g)) == "cols_first"


def vit_to_multimae(sd: Mapping[str, Tensor], source: str = "state_dict", num_heads: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, Tensor], ConversionReport, tuple[str, ...]]:
    """Map a timm / MAE ViT state dict onto a MultiMAE rgb encoder (no decoders).

    Returns ``(ModelConfig fields, state dict in MultiMAE names, report (mapped, dropped),
    keys to initialise fresh)``. Raises :class:`ConversionError` naming every key it cannot place
    (layer scale, register tokens, qk-norm ... are not part of the MultiMAE encoder).
    """
    if not is_vit_layout(sd):
        raise ConversionError(f"{source}: not a timm/MAE ViT state dict (no patch_embed.proj.weight / blocks.*)")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ConversionError(f"{source}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    dim, chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    if chans != 3:
        raise ConversionError(f"{source}: patch_embed.proj.weight takes {chans} channels; the rgb input takes 3")
    report = ConversionReport(source, "mae" if is_mae(sd) else "timm")
    out: dict[str, Tensor] = {}

    def put(ours: str, theirs: str, v: Tensor | None = None) -> None:
        out[ours] = sd[theirs] if v is None else v
        report.mapped[ours] = theirs

    put("input_adapters.rgb.proj.weight", "patch_embed.proj.weight")
    if "patch_embed.proj.bias" in sd:
        put("input_adapters.rgb.proj.bias", "patch_embed.proj.bias")
    cls = sd.get("cls_token")
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise ConversionError(f"{source}: no (1, N, D) 'pos_embed' (ViTs without absolute positions are not supported)")
    n_prefix = 1 if cls is not None else 0
    g = math.isqrt(pos.shape[1] - n_prefix)
    if g * g != pos.shape[1] - n_prefix:
        if cls is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # timm no_embed_class
            n_prefix, g = 0, math.isqrt(pos.shape[1])
        else:
            raise ConversionError(f"{source}: pos_embed has {pos.shape[1]} positions: not a square grid "
                                  f"(+{n_prefix} class position)")
    put("input_adapters.rgb.pos_emb", "pos_embed[:, 1:]" if n_prefix else "pos_embed",
        pos[:, n_prefix:].transpose(1, 2).reshape(1, dim, g, g).contiguous())
    if cls is not None:
        put("global_tokens", "cls_token + pos_embed[:, :1]" if n_prefix else "cls_token",
            cls + (pos[:, :1] if n_prefix else 0))
    depth = 0
    unknown = []
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            put(f"encoder.{m[1]}.{m[2]}.{m[3]}", k)
            depth = max(depth, int(m[1]) + 1)
        elif k.startswith("norm."):
            put("encoder_norm." + k[5:], k)
        elif (why := next((r for p, r in _UNUSED.items() if k.startswith(p)), None)) is not None:
            report.dropped[k] = why
        elif k not in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
            unknown.append(k)
    if unknown:
        raise ConversionError(f"{source}: keys with no place in a MultiMAE encoder (layer scale, register tokens, "
                              f"qk-norm, pre-norm ... are not supported): {sorted(unknown)}")
    cfg: dict[str, Any] = dict(
        preset=_preset_of(dim, depth),
        dim=dim, depth=depth,
        num_heads=default_heads(dim, source, num_heads, {"dim": dim, "depth": depth, "patch_size": patch}),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0,
        patch_size=patch, image_size=g * patch, num_global_tokens=1, inputs=["rgb"], outputs=[],
        encoder_norm="norm.weight" in sd,
    )
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in out.items()}, report, \
        (() if cls is not None else ("global_tokens",))


def _preset_of(dim: int, depth: int) -> str:
    """The preset of that width and depth ("large" for wider ones, "base" otherwise; the sizes are
    set explicitly anyway, the preset only names the decoders' defaults)."""
    from multimae.model.presets import PRESETS

    return next((n for n, p in PRESETS.items() if (p["dim"], p["depth"]) == (dim, depth)),
                "large" if dim > 1024 else "base")


def to_timm_state_dict(model: torch.nn.Module, input_name: str = "rgb", image_size: int | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, Any], ConversionReport]:
    """Export a MultiMAE encoder (one image input) as a timm ``VisionTransformer`` state dict.

    Returns ``(state dict, timm constructor kwargs)``: build the timm model with
    ``timm.create_model(name, pretrained=False, num_classes=0)`` for a named size
    (:data:`TIMM_NAMES`; ``kwargs["model_name"]``) or ``VisionTransformer(**kwargs)``, then
    ``load_state_dict(sd)``. Shapes: ``pos_embed`` (1, 1 + (S/p)^2, D), ``cls_token`` (1, 1, D).
    ``image_size`` resizes the position table (default: the model's). The report maps timm keys
    to ours and lists what is left out (other inputs, decoders) and what is made up.
    """
    cfg = model.config
    if input_name not in model.input_adapters:
        raise ConversionError(f"the model has no {input_name!r} input (inputs: {sorted(model.input_adapters)})")
    spec = model.input_specs[input_name]
    if spec.kind not in ("image", "dense") or spec.stride != 1:
        raise ConversionError(f"input {input_name!r} ({spec.kind}) is not a patch-embedded image input")
    if cfg.num_global_tokens != 1:
        raise ConversionError(f"timm ViTs have one class token; this model has {cfg.num_global_tokens} global tokens")
    own = {k: v.detach().float() for k, v in model.state_dict().items()}
    size = image_size or cfg.image_size
    if size % cfg.patch_size:
        raise ConversionError(f"image_size {size} is not divisible by the patch size {cfg.patch_size}")
    g = size // cfg.patch_size
    src = f"input_adapters.{input_name}"
    table, how = resize_pos_table(own[f"{src}.pos_emb"], (g, g))
    D = cfg.dim
    report = ConversionReport(getattr(model, "provenance", {}).get("source", "model"), "timm export")
    sd = {
        "cls_token": own["global_tokens"].clone(),
        "pos_embed": torch.cat([table.new_zeros(1, 1, D), table.flatten(2).transpose(1, 2)], dim=1).contiguous(),
        "patch_embed.proj.weight": own[f"{src}.proj.weight"],
        "patch_embed.proj.bias": own[f"{src}.proj.bias"],
    }
    report.mapped.update({"cls_token": "global_tokens", "pos_embed[:, 1:]": f"{src}.pos_emb",
                          "patch_embed.proj.weight": f"{src}.proj.weight", "patch_embed.proj.bias": f"{src}.proj.bias"})
    report.added["pos_embed[:, :1]"] = "class position: zeros (the global token carries no position)"
    if how != "unchanged":
        report.resized["pos_embed"] = f"{own[f'{src}.pos_emb'].shape[-1]} -> {g} per side, {how}"
    for k, v in own.items():
        theirs = ("blocks." + k[len("encoder."):] if k.startswith("encoder.") else
                  "norm." + k[len("encoder_norm."):] if k.startswith("encoder_norm.") else None)
        if theirs is not None:
            sd[theirs] = v
            report.mapped[theirs] = k
        elif not k.startswith((f"{src}.", "global_tokens")):
            a = k.split(".")[0]
            report.dropped[k] = ("decoders (not part of a timm ViT)" if a in ("output_adapters", "shared_decoder")
                                 else f"input {k.split('.')[1]!r} (a timm ViT has one image input)"
                                 if a == "input_adapters" else "not part of a timm ViT")
    if "norm.weight" not in sd:
        sd["norm.weight"], sd["norm.bias"] = table.new_ones(D), table.new_zeros(D)
        report.added["norm.weight, norm.bias"] = ("identity-affine LayerNorm (MultiMAE has no final norm: timm's "
                                                  "forward_features = LayerNorm(MultiMAE tokens))")
    kwargs: dict[str, Any] = dict(img_size=size, patch_size=cfg.patch_size, in_chans=spec.channels, embed_dim=D,
                                  depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=0)
    name = TIMM_NAMES.get((D, cfg.depth, cfg.num_heads, cfg.patch_size))
    if name is not None and cfg.mlp_ratio == 4.0 and spec.channels == 3:
        kwargs["model_name"] = name
    return sd, kwargs, report


# --- transformers ViT / ViTMAE directories (names in multimae.checkpoint.hf) ---------------------


def load_hf_vit(path: Any, num_heads: int | None = None
                ) -> tuple[dict[str, Any], dict[str, Tensor], ConversionReport, tuple[str, ...]]:
    """A transformers ViT / ViTMAE directory -> (ModelConfig fields, MultiMAE state dict, report,
    fresh keys), as :func:`vit_to_multimae` returns them; heads, eps and sizes from ``config.json``."""
    d = Path(path)
    cfg = hf.hf_config(d)
    if cfg is None:
        raise ConversionError(f"{d}: not a transformers ViT / ViTMAE directory (config.json model_type "
                              f"{hf.HF_MODEL_TYPES})")
    where = str(d / hf.CONFIG)
    heads = hf.check_hf_config(cfg, where, num_heads)
    sd: dict[str, Tensor] = {}
    for f in hf.weight_files(d):
        sd.update(read_state_dict(f))
    timm_sd, dropped = hf.hf_to_timm(sd, cfg, str(d))
    fields, ours, report, fresh = vit_to_multimae(timm_sd, str(d), heads)
    report.kind = f"transformers-{cfg['model_type']}"
    report.dropped.update(dropped)
    return hf.hf_fields(cfg, fields, where), ours, report, fresh


def to_transformers_vitmae(model: torch.nn.Module, directory: Any, input_name: str = "rgb") -> tuple[Any, ConversionReport]:
    """Write ``model``'s encoder (one image input) as a transformers ``ViTMAEModel`` directory:
    ``config.json`` + ``model.safetensors``, each written atomically. Returns (directory, report)."""
    sd, kwargs, report = to_timm_state_dict(model, input_name)
    cfg = model.config
    report.kind = "transformers ViTMAEModel export"
    weights = hf.timm_to_hf(sd, cfg.dim)
    config = hf.vitmae_config(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, float(cfg.norm_eps),
                              int(kwargs["img_size"]), cfg.patch_size, int(kwargs["in_chans"]))
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConversionError(f"{d} exists and is not a directory")
    save_file_atomic(d / "model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    save_file_atomic(d / hf.CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    return d, report
