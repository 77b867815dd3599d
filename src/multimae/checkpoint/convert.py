"""Reading checkpoints, fitting them into a model, and the one report of every load.

This layer sits below the model: it never imports :mod:`multimae.model.multimae`. It reads state dicts,
infers model configs (:class:`~multimae.model.config.ModelConfig`, in :class:`ConvertedWeights`) and fits tensors
into a model it is given with the one fit function, :func:`fit_state_dict` (a MultiMAE:
:meth:`multimae.model.multimae.MultiMAE.from_pretrained`; a transfer model:
:func:`multimae.model.transfer.build_transfer_model`; a run's model: :func:`.pretrained.init_from`),
reporting in one :class:`ConversionReport`.

One filter function per source. Official MultiMAE (EPFL-VILAB/MultiMAE) checkpoints use the
same parameter names as this library, so the filter only infers the architecture from the
tensors' shapes, keeps the model's keys and asserts that nothing is missing or unexpected.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read directly, ``.pth``
files with ``torch.load(weights_only=True)`` (``argparse.Namespace`` -- the ``args`` entry of
official training checkpoints -- is the one extra class allowed).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from multimae.core import modalities as M
from multimae.model.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint does not fit the model: names the file and the keys."""


_PROBLEMS = {"missing": "missing keys", "unexpected": "unexpected keys", "shapes": "shape mismatches",
             "dupes": "duplicate names that disagree"}


def fit_error(source: str, target: str, **problems: list) -> ConversionError | None:
    """One error listing every key problem (``missing``, ``unexpected``, ``shapes``, ``dupes``, in
    the order given), or None when there is none."""
    parts = [f"{_PROBLEMS[kind]}: {keys}" for kind, keys in problems.items() if keys]
    return ConversionError(f"{source} does not fit {target} -- " + "; ".join(parts)) if parts else None


@dataclass
class ConversionReport:
    """What loading weights did, key by key: the one report of every load (``from_pretrained``,
    ``train.init``, a transfer model's ``init``, ``multimae convert``).

    source: the file or directory read; kind: ``"multimae"`` (this library), ``"official-multimae"``,
    ``"mae"``, ``"timm"``, ``"transformers-<type>"`` or ``"scratch"``.
    mapped: model key -> the source key (or expression) it came from.
    dropped: source key -> why it is not used (an input / output not requested, a MAE decoder, a
        classification head ...).
    added: model key -> why it is freshly initialised (an input / output the source has not).
    resized: model key -> how its position table was fitted to the new grid.
    aliases: source keys that are a second name of a loaded tensor (the official DPT head
        registers modules twice); checked equal, loaded once.
    new_inputs: input modalities that got a fresh input adapter (the source has none).
    """

    source: str
    kind: str
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)
    resized: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    new_inputs: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> list[str]:
        """Model keys copied from the source, sorted."""
        return sorted(self.mapped)

    @property
    def missing(self) -> list[str]:
        """Model keys left at their initialisation, sorted."""
        return sorted(self.added)

    def summary(self) -> str:
        """One line: counts."""
        return (f"{self.source} ({self.kind}): {len(self.mapped)} tensors mapped, {len(self.dropped)} dropped, "
                f"{len(self.added)} added, {len(self.resized)} position tables resized")

    def init_summary(self) -> str:
        """One line for a fine-tuning log: tensors loaded, dropped, fresh (by top-level module)."""
        fresh = sorted({k.split(".")[0] for k in self.added})
        return (f"init {self.source}: {len(self.mapped)} tensors loaded, {len(self.dropped)} dropped, "
                f"{len(self.added)} fresh ({', '.join(fresh) or 'none'})"
                + (f"; new input projections: {', '.join(self.new_inputs)}" if self.new_inputs else ""))

    def lines(self) -> list[str]:
        """Human-readable report: the summary, the renames (block indices folded into ``N``), then
        dropped / added / resized keys grouped by reason."""
        out = [self.summary()]
        renames = Counter((re.sub(r"\.\d+\.", ".N.", theirs), re.sub(r"\.\d+\.", ".N.", ours))
                          for ours, theirs in self.mapped.items() if ours != theirs)
        same = len(self.mapped) - sum(renames.values())
        if same:
            out.append(f"  mapped: {same} tensors under their own names")
        for (theirs, ours), n in renames.items():
            out.append(f"  mapped: {theirs} -> {ours}" + (f" ({n} tensors)" if n > 1 else ""))
        for title, d in (("dropped", self.dropped), ("added", self.added), ("resized", self.resized)):
            groups: dict[str, list[str]] = {}
            for k, why in d.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")
                out.append(f"  {title}: {shown} -- {why}")
        return out


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict from a ``.pth``/``.pt`` (its ``model`` or ``state_dict`` entry, or itself),
    a ``.safetensors`` file, or a mapping (returned as a dict)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({e})") from e
    if isinstance(obj, Mapping):
        for k in ("model", "state_dict", "model_state"):
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: no state_dict found (expected a 'model' entry of tensors)")
    return dict(obj)


#: head counts of the standard ViT widths (Ti, S, M, B, L, H, g, G, e); any other width must be told
KNOWN_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16, 1792: 16}


class UnknownHeadCount(ConversionError):
    """A checkpoint of a non-standard width whose head count was not given; ``arch``: the
    architecture read off the tensors (dim, depth, patch_size), for a hint naming the setting."""

    def __init__(self, message: str, arch: Mapping[str, int]) -> None:
        super().__init__(message)
        self.arch = dict(arch)


def default_heads(dim: int, source: str = "checkpoint", num_heads: int | None = None,
                  arch: Mapping[str, int] | None = None) -> int:
    """Attention heads of a ViT of width ``dim``: ``num_heads`` when given, else the standard ViT's
    of that width (:data:`KNOWN_HEADS`). Weights do not store the head count, and a wrong one gives
    wrong tokens without any error, so another width is refused with a message naming the setting."""
    if num_heads is not None:
        if dim % int(num_heads):
            raise ConversionError(f"{source}: num_heads={num_heads} does not divide the width {dim}")
        return int(num_heads)
    if dim not in KNOWN_HEADS:
        raise UnknownHeadCount(f"{source}: width {dim} is not a standard ViT's and the weights do not record the "
                               f"head count; pass num_heads= (from_pretrained(..., num_heads=H), "
                               f"`multimae convert --num-heads H`, train.init with model.num_heads=H)",
                               arch or {"dim": dim})
    return KNOWN_HEADS[dim]


@dataclass
class ConvertedWeights:
    """A source of weights, read and converted: what a model is built from
    (:meth:`multimae.model.multimae.MultiMAE.from_converted`).

    config: the architecture (overrides applied); state_dict: tensors in MultiMAE names, position
    tables still at the source's grid; report: what was mapped / dropped so far (building fills in
    resized / added); fresh: model keys (or key prefixes ending in ``.``) the source has none of,
    to leave at their initialisation; provenance: where the weights came from (set as
    ``model.provenance``), None for none; inferred: the config was read off the tensors' shapes
    (official checkpoints) rather than recorded next to them.
    """

    config: ModelConfig
    state_dict: dict[str, Tensor]
    report: ConversionReport
    fresh: tuple[str, ...] = ()
    provenance: dict[str, Any] | None = None
    inferred: bool = False


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_official_config(sd: Mapping[str, Tensor], num_heads: int | None = None, decoder_heads: int | None = None,
                          **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of an official MultiMAE state_dict, read off its tensor shapes.

    Head counts are not visible in the weights: ``num_heads`` defaults to the standard ViT's of
    that width (ViT-B 12, ...; another width needs ``num_heads``) and ``decoder_heads`` to 8
    (the official decoders)."""
    if "global_tokens" not in sd:
        raise ConversionError("not a MultiMAE state_dict: no 'global_tokens'")
    dim = sd["global_tokens"].shape[-1]
    depth = _count(sd, r"encoder\.(\d+)\.norm1\.weight")
    # modalities in the order of their first key
    inputs = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("input_adapters.")))
    outputs = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("output_adapters.")))
    mods: dict[str, dict[str, Any]] = {}
    patch_size = None
    grid = None
    for n in inputs:
        w = sd[f"input_adapters.{n}.proj.weight"]
        kernel = w.shape[-1]
        known = M.registered().get(n)
        ce = sd.get(f"input_adapters.{n}.class_emb.weight")
        stride = known.stride if known is not None else 1 if ce is None else 4
        mods[n] = {"channels": w.shape[1]} if ce is None else {"num_classes": ce.shape[0], "class_emb_dim": ce.shape[1]}
        mods[n]["stride"] = stride
        if known is None:
            mods[n].update(dict(kind="dense", loss="l1") if ce is None else dict(kind="categorical", loss="ce"))
        if patch_size is None or stride == 1:
            patch_size = kernel * stride
        pos = sd.get(f"input_adapters.{n}.pos_emb")
        if pos is not None:
            grid = pos.shape[-1]
    dec: dict[str, Any] = {}
    for n in outputs:
        if f"output_adapters.{n}.decoder.q.weight" not in sd:
            raise ConversionError(f"output adapter {n!r} has no cross-attention (use_xattn=False): not supported")
        dec["decoder_dim"] = sd[f"output_adapters.{n}.mask_token"].shape[-1]
        dec["decoder_depth"] = _count(sd, rf"output_adapters\.{n}\.decoder_transformer\.(\d+)\.norm1\.weight")
        out = sd[f"output_adapters.{n}.out_proj.weight"].shape[0]
        if n in mods:
            continue
        known = M.registered().get(n)
        if known is not None and known.kind == "categorical":
            mods[n] = {"num_classes": out // known.patch(patch_size or 16) ** 2}
        elif known is None:
            mods[n] = {"kind": "dense", "loss": "l1", "channels": out // ((patch_size or 16) ** 2)}
    if patch_size is None:
        raise ConversionError("cannot infer the patch size: no input adapter in the state_dict")
    cfg = dict(
        preset="base", dim=dim, depth=depth,
        num_heads=default_heads(dim, "official MultiMAE weights", num_heads,
                                {"dim": dim, "depth": depth, "patch_size": patch_size}),
        mlp_ratio=sd["encoder.0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0,
        patch_size=patch_size, image_size=(grid or 14) * patch_size, num_global_tokens=sd["global_tokens"].shape[1],
        inputs=inputs, outputs=outputs, modalities=mods,
        decoder_dim=dec.get("decoder_dim", 256), decoder_depth=dec.get("decoder_depth", 2),
        decoder_heads=decoder_heads or 8, encoder_norm="encoder_norm.weight" in sd,
    )
    return model_config(cfg, overrides)


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a ``.safetensors`` file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def check_config_fits(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config that does not describe the weights whose header shapes are ``shapes``,
    before a model of it is built: width, global tokens and depth are read from the header, and
    the config's parameter estimate may not be far above the tensors' (a ``depth: 1e9`` next to
    small weights). ``cfg``: as written, before overrides; ``where``: the config file."""
    from multimae.core.config import short_repr

    r = cfg.resolved()  # bounds and divisibility (ConfigError naming the key)
    g = shapes.get("global_tokens")
    if g is not None and len(g) == 3 and (g[1], g[2]) != (r.num_global_tokens, r.dim):
        raise ConversionError(f"{where}: model.dim = {r.dim}, model.num_global_tokens = {r.num_global_tokens} but "
                              f"the weights' global_tokens have shape {list(g)}")
    blocks = {k.split(".")[1] for k in shapes if k.startswith("encoder.") and k.split(".")[1].isdigit()}
    if blocks and len(blocks) != r.depth:
        raise ConversionError(f"{where}: model.depth = {short_repr(r.depth)} but the weights hold {len(blocks)} "
                              "encoder blocks")
    numel = sum(math.prod(s) for s in shapes.values())
    estimate = 12 * r.depth * r.dim ** 2
    if estimate > 4 * numel + 1_000_000:
        raise ConversionError(f"{where}: describes a model of ~{estimate / 1e6:.0f}M encoder parameters but the "
                              f"weights hold {numel / 1e6:.1f}M values")


def model_config(fields: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """``ModelConfig(**fields)`` with ``overrides`` applied, every value type-checked; an unknown
    or ill-typed field is a :class:`ConversionError` naming it and the valid ones."""
    import dataclasses

    from multimae.core.config import ConfigError, from_dict, to_dict

    merged = {**dict(fields), **dict(overrides or {})}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(merged) - names)
    if bad:
        raise ConversionError(f"unknown model setting(s) {bad}; valid: {sorted(names)}")
    try:
        return from_dict(ModelConfig, to_dict(merged))
    except ConfigError as e:
        raise ConversionError(f"model setting: {e}") from e


def _adapter_of(key: str) -> tuple[str, str] | None:
    """("input" | "output", modality) of an adapter key, else None."""
    for prefix, kind in (("input_adapters.", "input"), ("output_adapters.", "output")):
        if key.startswith(prefix):
            return kind, key[len(prefix):].split(".")[0]
    return None


def _not_requested(key: str, config: ModelConfig, model: nn.Module) -> str | None:
    """Why a source adapter has no place: its modality is not among ``config``'s (overrides) or
    the model's inputs / outputs; None for any other key."""
    a = _adapter_of(key)
    if a is None:
        return None
    names = config.inputs if a[0] == "input" else config.outputs
    have = getattr(model, "input_adapters" if a[0] == "input" else "output_adapters", {})
    return f"{a[0]} {a[1]!r} not requested" if a[1] not in names or a[1] not in have else None


def _no_place(key: str, model: nn.Module) -> str | None:
    """Why a source key the model lacks is dropped rather than an error, or None."""
    if key.startswith("encoder_norm."):
        return "no final norm in this model (model.encoder_norm=true keeps it)"
    if key.startswith("shared_decoder."):
        return "shared decoder not requested (decoder=per_task)"
    if key.startswith("head.") and hasattr(model, "head"):
        return "head of another task (the model's head is fresh)"
    return None


def _fresh_reason(key: str, sd: Mapping[str, Tensor], src_mods: set, fresh: tuple[str, ...]) -> str | None:
    """Why a model key the source has not is left at its initialisation, or None (an error)."""
    a = _adapter_of(key)
    if a is not None and a not in src_mods:
        return f"new {a[0]} {a[1]!r} (freshly initialised)"
    if key.startswith("encoder_norm.") and not any(x.startswith("encoder_norm.") for x in sd):
        return "final encoder norm the source has not (identity init)"
    if key.startswith("shared_decoder.") and not any(x.startswith("shared_decoder.") for x in sd):
        return "shared decoder (freshly initialised)"
    if key in fresh or any(f.endswith(".") and key.startswith(f) for f in fresh):
        return "not in the source (freshly initialised)"
    return None


def fit_state_dict(model: nn.Module, weights: ConvertedWeights, drop_unexpected: bool = False,
                   keep_missing: bool = False) -> ConversionReport:
    """Load ``weights`` (MultiMAE names) into ``model`` -- any model built on
    :class:`multimae.model.encoder.Encoder`: a MultiMAE or a transfer model -- fitting them to
    it; the one fit function of every load. Returns ``weights.report``, completed.

    * position tables built for another grid: sine-cosine ones regenerated, learned ones resampled
      (:mod:`multimae.checkpoint.resize`), listed in ``report.resized``;
    * adapters of modalities not requested (by the config's overrides or the model), a final norm
      the model does not keep, a shared decoder it does not have, a head of another task:
      ``report.dropped``; ``drop_unexpected``: any other key without a place too (else an error);
    * adapters of modalities the source has none of (``report.new_inputs`` for inputs), a final
      norm or shared decoder the source has not, the keys in ``weights.fresh``: left at their
      initialisation, ``report.added``; ``keep_missing``: every model key the source has not.

    Anything else missing or unexpected, and every shape mismatch, is a :class:`ConversionError`
    listing all of them. Floating tensors are cast to the model's dtype.
    """
    from multimae.checkpoint.resize import fit_pos_tables

    report = weights.report
    own = model.state_dict()
    modes = {f"input_adapters.{n}.pos_emb": getattr(a, "pos_mode", "bicubic") for n, a in model.input_adapters.items()}
    sd, report.resized = fit_pos_tables(weights.state_dict, own, modes)
    take: dict[str, Tensor] = {}
    unexpected, shapes = [], []
    for k in [*(k for k in own if k in sd), *(k for k in sd if k not in own)]:  # in the model's order
        v = sd[k]
        why = _not_requested(k, weights.config, model)
        if why is None and k in own:
            if tuple(v.shape) != tuple(own[k].shape):
                src = report.mapped.get(k, k)
                shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                              + (f" (checkpoint key {src})" if src != k and " " not in src else ""))
            else:
                take[k] = v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
            continue
        why = why or _no_place(k, model)
        if why is None and not drop_unexpected:
            unexpected.append(k)
        else:
            report.dropped[k] = why or "no place in this model"
    src_mods = {a for k in sd if k not in report.dropped and (a := _adapter_of(k)) is not None}
    missing = []
    for k in own:
        if k in take or any(s.startswith(f"{k}:") for s in shapes):
            continue
        why = _fresh_reason(k, sd, src_mods, weights.fresh) or (
            "not in the source (freshly initialised)" if keep_missing else None)
        if why is None:
            missing.append(k)
        else:
            report.added[k] = why
    report.mapped = {k: report.mapped.get(k, k) for k in take}
    report.new_inputs = [n for n in model.input_adapters if ("input", n) not in src_mods]
    err = fit_error(report.source, "the model", missing=missing, unexpected=sorted(unexpected), shapes=shapes)
    if err is not None:
        hint = (" (fine-tuning weights: load them with multimae.model.transfer.build_transfer_model)"
                if any(k.startswith("head.") for k in unexpected) else "")
        raise ConversionError(str(err) + hint)
    model.load_state_dict({**own, **take}, strict=True)
    return report


def load_state_strict(model: torch.nn.Module, sd: Mapping[str, Tensor], source: str = "state_dict") -> None:
    """Copy ``sd`` into ``model``; any missing or unexpected key, or shape mismatch, is an error
    that lists them all."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    err = fit_error(source, "the model", missing=missing, unexpected=unexpected, shapes=shapes)
    if err is not None:
        raise err
    model.load_state_dict(dict(sd), strict=True)
