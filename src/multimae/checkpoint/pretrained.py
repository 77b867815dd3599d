"""``save_pretrained`` / ``from_pretrained``: one reader for every source of weights.

A pretrained directory is the layout the Hugging Face Hub serves, so it uploads unchanged::

    DIR/config.json        {"model_type": "multimae", "format_version": 1, "model": {ModelConfig}, ...}
    DIR/model.safetensors  the weights (safetensors; never pickled)
    DIR/README.md          model card: modalities, preset, training data / steps when known, how to load

:func:`read_pretrained` accepts such a directory, a run or checkpoint directory of this library
(or its ``model.safetensors``), an official MultiMAE ``.pth``, a facebookresearch/mae ``.pth``
(encoder-only or ``_full``), a timm ViT state dict (``.pth`` / ``.safetensors``), a transformers
``ViTMAE*`` / ``ViT*`` directory (:mod:`.hf`) or an in-memory
state dict, and applies :class:`~multimae.model.multimae.ModelConfig` overrides on load (``image_size``,
``inputs``, ``outputs`` ...). Each external source is one filter function (:func:`.vit.vit_to_multimae`,
:func:`.hf.hf_to_timm`, :func:`.convert.infer_official_config`). It returns
:class:`~.convert.ConvertedWeights` (a config, the tensors, a :class:`~.convert.ConversionReport`);
the model is built above this layer (:meth:`multimae.model.multimae.MultiMAE.from_pretrained`,
:func:`multimae.model.transfer.build_transfer_model`), and :func:`init_from` fits them into a
model it is given. Nothing here imports :mod:`multimae.model.multimae`.
Nothing is unpickled beyond tensors (:func:`~.convert.read_state_dict`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import save_file as _st_save_file
from torch import Tensor, nn

from multimae.checkpoint.convert import (
    ConversionError,
    ConversionReport,
    ConvertedWeights,
    UnknownHeadCount,
    check_config_fits,
    fit_state_dict,
    header_shapes,
    infer_official_config,
    model_config,
    read_state_dict,
)
from multimae.checkpoint.io import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _library_version,
    _load_weights_file,
    _prepare_weights,
    load_meta,
    resolve_checkpoint,
    save_file_atomic,
    upgrade_weights,
)
from multimae.checkpoint.hf import hf_config
from multimae.checkpoint.vit import is_vit_layout, load_hf_vit, vit_to_multimae
from multimae.model.config import ModelConfig

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
#: Version of the pretrained-directory layout; readers refuse newer ones.
PRETRAINED_FORMAT_VERSION = 1

__all__ = ["CONFIG_FILE", "PRETRAINED_FORMAT_VERSION", "init_from", "model_card", "read_pretrained", "save_pretrained"]

_ACCEPTED = ("a save_pretrained directory (config.json + model.safetensors), a run or checkpoint directory, "
             "an official MultiMAE / MAE .pth, a timm ViT .pth/.safetensors, or a transformers ViT / ViTMAE "
             "directory")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, directory: str | os.PathLike, training: Mapping[str, Any] | None = None,
                    source: str | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card into ``directory``.

    model: a :class:`~multimae.model.multimae.MultiMAE` (its ``config`` and ``state_dict()`` are written).
    training: what the weights were trained on, for the card (``{"data": ..., "steps": ...}``);
        defaults to what loading recorded in ``model.provenance`` (:func:`read_pretrained`).
    Each file is written atomically; ``config.json`` last, so a directory holding it is complete.
    """
    from multimae.core.config import to_dict

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d} exists and is not a directory")
    prov = dict(getattr(model, "provenance", None) or {})
    if training is not None:
        prov["training"] = dict(training)
    if source is not None:
        prov["source"] = source
    config = {
        "model_type": "multimae",
        "format_version": PRETRAINED_FORMAT_VERSION,
        "library_version": _library_version(),
        "model": to_dict(model.config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **{k: prov[k] for k in ("source", "source_kind", "training") if k in prov},
    }
    text = json.dumps(config, indent=2) + "\n"
    weights = _prepare_weights(model.state_dict())
    save_file_atomic(d / WEIGHTS_FILE, lambda p: _st_save_file(weights, str(p), metadata={"format": "pt"}))
    save_file_atomic(d / CARD_FILE, lambda p: p.write_text(model_card(config, d.name), encoding="utf-8"))
    save_file_atomic(d / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return d


def _modality_line(cfg: Mapping[str, Any], names: list[str]) -> str:
    if not names:
        return "none (encoder only)"
    specs = ModelConfig(**{**cfg, "inputs": [], "outputs": []}).specs(names)
    return ", ".join(f"{s.name} ({s.kind}" + (f", {s.num_classes} classes" if s.kind == "categorical" else
                                              f", {s.channels} ch" if s.kind != "text" else "") + ")" for s in specs)


def model_card(config: Mapping[str, Any], name: str = "model") -> str:
    """The ``README.md`` of a pretrained directory (Hugging Face model-card front matter + tables)."""
    m = config["model"]
    tr = config.get("training") or {}
    rows = [
        ("preset", f"{m['preset']} ({m['dim']}-d, {m['depth']} blocks, {m['num_heads']} heads, "
                   f"{m['patch_size']}px patches)"),
        ("image size", f"{m['image_size']}px (any multiple of the patch size works; position tables are resampled)"),
        ("inputs", _modality_line(m, list(m["inputs"]))),
        ("outputs", _modality_line(m, list(m["outputs"]))),
        ("decoders", f"{m['decoder']}, {m['decoder_dim']}-d x {m['decoder_depth']}" if m["outputs"] else "none"),
        ("final encoder norm", "yes (from a MAE / timm ViT)" if m.get("encoder_norm") else "no (MultiMAE)"),
        ("parameters", f"{config.get('num_parameters', 0) / 1e6:.2f}M"),
        ("training data", str(tr.get("data", "unknown"))),
        ("training steps", str(tr.get("steps", "unknown"))),
        ("converted from", f"{config.get('source')} ({config.get('source_kind')})" if config.get("source") else "-"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: multimae
license: apache-2.0
tags: [multimae, masked-autoencoder, vision, multi-modal]
---
# {name}: MultiMAE ({m['preset']})

Multi-modal multi-task masked autoencoder weights saved by the `multimae` library
(version {config.get('library_version', 'unknown')}, pretrained format {config['format_version']}).

| | |
|---|---|
{table}

## Load

```python
from multimae import MultiMAE
model = MultiMAE.from_pretrained("{name}")                      # this directory
model = MultiMAE.from_pretrained("{name}", image_size=384)      # position tables fitted to 384px
encoder = MultiMAE.from_pretrained("{name}", outputs=[])        # encoder only
```

From the Hub: `huggingface_hub.snapshot_download(repo_id)` returns a directory to pass to
`from_pretrained`. As a timm ViT: `multimae convert {name} vit.safetensors --to timm`.
"""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _is_pretrained_dir(p: Path) -> bool:
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file() and not (p / META_FILE).is_file()


def _read_pretrained_config(d: Path) -> dict[str, Any]:
    f = d / CONFIG_FILE
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "multimae" or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{f}: not a multimae config.json (expected model_type 'multimae' and a 'model' object)")
    v = cfg.get("format_version")
    if not isinstance(v, int) or v > PRETRAINED_FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {v!r} is not supported (this multimae reads up to "
                              f"{PRETRAINED_FORMAT_VERSION}); upgrade multimae")
    return cfg


def _check_fits(fields: Mapping[str, Any], weights_file: Path, where: Path) -> None:
    """The model config ``where`` records, checked (bounds, divisibility, against the header of
    ``weights_file``) before the weights are read or a model is built; one line naming ``where``."""
    from multimae.core.config import ConfigError

    if not weights_file.is_file():
        return  # the loader names the missing file
    shapes = header_shapes(weights_file)  # an unreadable file: ConversionError naming it
    try:
        check_config_fits(model_config(fields), shapes, str(where))
    except (ConfigError, ConversionError) as e:
        text = str(e)
        raise CheckpointError(text if text.startswith(str(where)) else f"{where}: {text}") from None


def _describe_data(data: Mapping[str, Any]) -> str:
    src = data.get("source", "?")
    if src == "synthetic":
        return f"built-in synthetic scenes ({data.get('num_samples')} per epoch, {data.get('image_size')}px)"
    where = data.get("root") or data.get("urls")
    # the split trained on: a fine-tuning run's data.train_split (its data.split, in runs saved
    # before data.eval_split, was the evaluated one), a pretraining run's data.split
    return f"{src}: {where} (split {data.get('train_split') or data.get('split', '?')})"


def _run_model_fields(meta: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The encoder's ModelConfig fields a run recorded: a pretraining run's ``model``, a
    fine-tuning / probe run's ``model.encoder``."""
    model = (meta.get("config") or {}).get("model")
    if isinstance(model, dict) and "head" in model:  # a fine-tuning run: model = TransferModelConfig
        model = model.get("encoder")
    if not isinstance(model, dict):
        raise ConversionError(f"{where}: meta.json has no model config")
    return model


def _weights(fields: Mapping[str, Any], overrides: Mapping[str, Any], sd: Mapping[str, Tensor],
             report: ConversionReport, fresh: tuple[str, ...] = ()) -> ConvertedWeights:
    return ConvertedWeights(model_config(fields, overrides), dict(sd), report, fresh)


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` prefix every key carries (a DDP-wrapped save)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _from_state_dict(sd: dict[str, Tensor], source: str, overrides: Mapping[str, Any]) -> ConvertedWeights:
    """A state dict of no recorded architecture: timm / MAE (renamed), or MultiMAE names (official,
    or this library's weights; version-1 fine-tuning names upgraded), the config read off the shapes."""
    sd = upgrade_weights(_strip_prefix(sd))
    if is_vit_layout(sd):
        fields, ours, report, fresh = vit_to_multimae(sd, source, overrides.get("num_heads"))
        return _weights(fields, overrides, ours, report, fresh)
    if "global_tokens" in sd and any(k.startswith("input_adapters.") for k in sd):
        over = dict(overrides)
        heads = over.pop("num_heads", None)
        dec_heads = over.pop("decoder_heads", None)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        view = sd  # outputs=[] on an official fine-tuned checkpoint: its heads are not read (the fit drops them)
        if "outputs" in over:
            keep = tuple(f"output_adapters.{t}." for t in over["outputs"])
            view = {k: v for k, v in sd.items() if not k.startswith("output_adapters.") or k.startswith(keep)}
        try:
            cfg = infer_official_config(view, heads, dec_heads)
        except UnknownHeadCount:
            raise
        except ConversionError as e:
            raise ConversionError(f"{source}: {e} (an official fine-tuned checkpoint loads into a transfer model: "
                                  "multimae.model.transfer.build_transfer_model)") from e
        from multimae.core.config import to_dict

        weights = _weights(to_dict(cfg), over, sd, ConversionReport(source, "official-multimae"))
        weights.inferred = True
        return weights
    shown = sorted(sd)[:8]
    raise ConversionError(f"{source}: unrecognised state dict (first keys {shown}); expected {_ACCEPTED}")


def _export_hints(p: Path) -> dict[str, Any]:
    """Head count recorded by ``multimae convert --to timm`` in a safetensors file's metadata."""
    if p.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    except Exception:  # noqa: BLE001 - unreadable metadata: read_state_dict reports the file
        return {}
    return {"num_heads": int(kwargs["num_heads"])} if isinstance(kwargs, dict) and "num_heads" in kwargs else {}


def read_pretrained(source: str | os.PathLike | Mapping[str, Tensor], num_heads_hint: int | None = None,
                    **overrides: Any) -> ConvertedWeights:
    """Read ``source`` (see the module docstring) and convert it: the :class:`ModelConfig` (with
    ``overrides`` applied, every field checked), the tensors in MultiMAE names, the report so far
    and the provenance (the source and, for runs, the training data and steps).

    overrides: :class:`ModelConfig` fields (``image_size=384``, ``inputs=["rgb"]``, ``outputs=[]``,
    ``num_heads`` for an external checkpoint whose head count is not the ViT default ...).
    The one reader of every load: :meth:`multimae.model.multimae.MultiMAE.from_pretrained`,
    :func:`init_from` and :func:`multimae.model.transfer.build_transfer_model` build or fill a
    model from the result (:func:`multimae.checkpoint.convert.fit_state_dict`). A fine-tuning run's
    encoder config is its ``model.encoder``; its head's tensors come along as ``head.*``.
    ``num_heads_hint``: the head count of a source that records none of this library's configs
    (official, timm, MAE, transformers weights); a run's or pretrained directory's own wins.
    """
    origin: tuple[str, str] | None = None
    training = None
    ext = {**({"num_heads": num_heads_hint} if num_heads_hint else {}), **overrides}  # external sources
    if isinstance(source, Mapping):
        weights = _from_state_dict(dict(source), "state_dict", ext)
    else:
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (expected {_ACCEPTED})")
        if p.is_file() and p.name == WEIGHTS_FILE and (_is_pretrained_dir(p.parent) or (p.parent / META_FILE).is_file()):
            p = p.parent
        if p.is_dir() and hf_config(p) is not None:  # transformers ViT / ViTMAE save_pretrained directory
            fields, ours, report, fresh = load_hf_vit(p, ext.get("num_heads"))
            weights = _weights(fields, ext, ours, report, fresh)
        elif p.is_dir() and _is_pretrained_dir(p):
            cfg = _read_pretrained_config(p)
            _check_fits(cfg["model"], p / WEIGHTS_FILE, p / CONFIG_FILE)
            weights = _weights(cfg["model"], overrides, _load_weights_file(p / WEIGHTS_FILE),
                               ConversionReport(str(p), "multimae"))
            training = cfg.get("training")
            origin = (cfg["source"], cfg.get("source_kind", "multimae")) if cfg.get("source") else None
        elif p.is_dir():
            ckpt = resolve_checkpoint(p)
            meta = load_meta(ckpt)
            fields = _run_model_fields(meta, ckpt)
            _check_fits(fields, ckpt / WEIGHTS_FILE, ckpt / META_FILE)
            weights = _weights(fields, overrides, _load_weights_file(ckpt / WEIGHTS_FILE, meta["format_version"]),
                               ConversionReport(str(ckpt), "multimae"))
            data = (meta.get("config") or {}).get("data") or {}
            training = {"data": _describe_data(data), "steps": meta.get("step"), "run": str(ckpt)}
        else:
            weights = _from_state_dict(read_state_dict(p), str(p), {**_export_hints(p), **ext})
    report = weights.report
    src, kind = origin or (report.source, report.kind)  # converted weights keep where they first came from
    weights.provenance = {"source": src, "source_kind": kind, **({"training": training} if training else {})}
    return weights


def init_from(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], **overrides: Any
              ) -> ConversionReport:
    """Start ``model`` (a :class:`~multimae.model.multimae.MultiMAE`, e.g. the one a run is about to train)
    from the weights of ``source``.

    ``source`` is anything :func:`read_pretrained` reads (a MAE or timm ViT, an official
    checkpoint, a run, a pretrained directory); its position tables are fitted to the model's grid
    (``report.resized``). Every tensor whose name and shape match is copied; the model's other
    tensors keep their initialisation (``report.added``, e.g. the decoders when starting from a MAE
    encoder); source tensors the model has no place for, and adapters of modalities ``overrides``
    leave out (``inputs=[...]``), are ``report.dropped``. A tensor present in both with different
    shapes is a :class:`ConversionError` (the architectures differ: dim, patch size ...).
    No second model is built: the tensors go straight into ``model``
    (:func:`multimae.checkpoint.convert.fit_state_dict`).
    """
    cfg = model.config
    # the head count is the model's (weights do not store it: external ones would be refused)
    weights = read_pretrained(source, **{"image_size": cfg.image_size, "num_heads": cfg.num_heads, **overrides})
    return fit_state_dict(model, weights, drop_unexpected=True, keep_missing=True)
