"""The one way to open a trained run: :func:`load_run(path, device) <load_run>` -> :class:`Run`.

A run (its directory, ``checkpoints/`` or one step directory) is a pretraining, fine-tuning or
linear-probe run (``meta.json``'s ``kind``); MultiMAE weights without a run (a ``save_pretrained``
directory, official / MAE / timm weights) open as a pretraining run. The :class:`Run` holds what
``predict``, ``export``, ``evaluate``, the demo, ``pseudolabel`` and ``visualize`` need, so none of
them builds a model by kind:

* pretraining: :class:`~multimae.model.multimae.MultiMAE` read by the weights path
  (:meth:`MultiMAE.from_pretrained <multimae.model.multimae.MultiMAE.from_pretrained>`);
* fine-tuning: :class:`~multimae.model.transfer.TransferModel` of the saved ``model`` config;
* linear probe: :class:`ProbeModel`, a transfer model whose head is the probe.

Transfer weights are loaded strictly, in one go (a probe's ``probe.*`` beside the encoder's).
This module sits below the engine and the tasks (they build typed configs from :attr:`Run.config`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import torch
from torch import Tensor, nn

from multimae.checkpoint import CheckpointError, load_meta, load_weights, resolve_checkpoint
from multimae.checkpoint.convert import load_state_strict
from multimae.core.config import apply_overrides, from_dict, upgrade_saved_config
from multimae.core.device import resolve_device
from multimae.core.modalities import ModalitySpec
from multimae.model.transfer import TransferModel, TransferModelConfig

T = TypeVar("T")
RunKind = Literal["pretrain", "finetune", "probe"]
#: the field a head predicts when ``data.target`` is not set
DEFAULT_TARGETS = {"classification": "label", "segmentation": "semseg", "depth": "depth"}
PROBE_PREFIX = "probe."


@dataclass
class RunOutput:
    """One predicted output of a run. ``kind``: classification | segmentation | depth | dense;
    ``classes``: class names when the run's data names them (else None; ``num_classes`` says how
    many); ``units``: what dense values mean (``metric`` depth, ``robust-standardised``);
    ``mean`` / ``std``: an image output's normalisation (to undo for a preview)."""

    kind: str
    num_classes: int | None = None
    classes: list[str] | None = None
    units: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class Run:
    """An opened run: see the module doc. ``model`` is in eval mode on ``device``; ``inputs``: the
    modalities it takes (a transfer model's encoder inputs; a pretraining model's inputs);
    ``image_size``: its evaluation size; ``outputs``: output name -> :class:`RunOutput`."""

    kind: RunKind
    checkpoint: Path
    step: int | None
    config: dict[str, Any]
    model: nn.Module
    device: torch.device
    inputs: list[ModalitySpec]
    image_size: int
    outputs: dict[str, RunOutput]
    meta: dict[str, Any] = field(default_factory=dict)

    def section(self, cls: type[T], name: str) -> T:
        """A typed section of the run's config, e.g. ``run.section(DataConfig, "data")`` (its
        defaults where the run records none)."""
        return from_dict(cls, self.config.get(name) or {}, key=name)


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", overrides: Sequence[str] = ()) -> Run:
    """Open the run at ``path`` (see the module doc) on ``device`` (``auto``: a GPU if any);
    ``overrides``: dotted ``key=value`` applied to the saved config before the model is built."""
    dev = resolve_device(device)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"run {p} does not exist")
    meta: dict[str, Any] = {}
    ckpt = p
    if p.is_dir() and not _is_pretrained_dir(p):
        ckpt = resolve_checkpoint(p)
        meta = load_meta(ckpt)
    kind = meta.get("kind", "pretrain")
    config = apply_overrides(upgrade_saved_config(meta.get("config") or {}), list(overrides))
    if kind == "pretrain":
        model, inputs, size, outputs = _pretrain_model(ckpt, config, bool(meta))
    elif kind in ("finetune", "probe"):
        model, inputs, size, outputs = _transfer_model(ckpt, kind, config)
    else:
        raise CheckpointError(f"{ckpt}: unknown run kind {kind!r} in meta.json (expected pretrain, finetune or probe)")
    return Run(kind, ckpt, meta.get("step"), config, model.eval().to(dev), dev, inputs, size, outputs, meta)  # type: ignore[arg-type]


def _is_pretrained_dir(p: Path) -> bool:
    """A ``save_pretrained`` or transformers directory (weights without a run's ``meta.json``)."""
    return (p / "config.json").is_file() and not (p / "meta.json").is_file() and not (p / "checkpoints").is_dir()


Built = tuple[nn.Module, list[ModalitySpec], int, dict[str, RunOutput]]  # model, inputs, image size, outputs


def _pretrain_model(ckpt: Path, config: dict[str, Any], is_run: bool) -> Built:
    from multimae.model.multimae import MultiMAE

    model, report = MultiMAE.from_pretrained(ckpt, with_report=True)
    if is_run and (report.dropped or report.added):  # a run's own weights fit its model exactly
        odd = sorted(report.dropped) + sorted(report.added)
        raise CheckpointError(f"{ckpt}: the weights do not fit the run's model ({len(report.dropped)} unused, "
                              f"{len(report.added)} missing, e.g. {odd[0]})")
    outputs: dict[str, RunOutput] = {}
    for t, s in model.output_specs.items():
        if s.kind == "text":
            continue
        if s.kind == "categorical":
            outputs[t] = RunOutput("segmentation", s.num_classes, pretrain_classes(config.get("data") or {}, t, s.num_classes))
        elif s.kind == "image" and s.mean is not None and not s.norm_pix:
            outputs[t] = RunOutput("dense", mean=tuple(s.mean), std=tuple(s.std or (1.0,) * len(s.mean)))
        elif s.normalized and s.kind == "dense":  # a raster: raw = value * std + mean (the spec's)
            outputs[t] = RunOutput("dense", units=f"standardised per band with the run's {t} mean / std")
        else:
            outputs[t] = RunOutput("dense", units="robust-standardised" if s.standardize == "robust" else None)
    return model, list(model.input_specs.values()), int(model.config.image_size), outputs


class ProbeModel(TransferModel):
    """A linear-probe run's model: :meth:`TransferModel.features` (the frozen encoder's mean final
    token, (B, D)) -> ``probe`` (BatchNorm1d without affine + linear) -> (B, K) logits. Its state
    dict is the transfer model's plus ``probe.*``: what ``multimae probe`` saves."""

    def __init__(self, cfg: TransferModelConfig) -> None:
        from multimae.model.heads.probe import LinearProbe

        super().__init__(cfg)
        self.probe = LinearProbe(self.dim, int(cfg.head.num_classes or 0))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.probe(self.features(batch))


def _transfer_model(ckpt: Path, kind: str, config: dict[str, Any]) -> Built:
    if "model" not in config:
        raise CheckpointError(f"{ckpt}: meta.json records no model config of the {kind} run")
    mcfg = from_dict(TransferModelConfig, config["model"], key="model")
    model = (ProbeModel if kind == "probe" else TransferModel)(mcfg)
    load_state_strict(model, load_weights(ckpt), str(ckpt))
    data = config.get("data") or {}
    head = mcfg.head
    K = int(head.num_classes or 0) or None
    if kind == "probe":
        outputs = {"label": RunOutput("classification", K, class_names("classification", data))}
    else:
        target = target_name(head.kind, data.get("target"))
        outputs = {target: RunOutput(head.kind, K, class_names(head.kind, data),
                                     units="metric" if head.kind == "depth" else None)}
    size = int(data.get("image_size") or mcfg.encoder.image_size)  # type: ignore[union-attr]
    return model, list(model.input_specs.values()), size, outputs


def target_name(head_kind: str, target: str | None) -> str:
    """The field a transfer head predicts: ``data.target`` or the head kind's default."""
    if target:
        if head_kind == "classification" and target != "label":
            raise ValueError(f"data.target={target!r}: a classification head predicts 'label'")
        return target
    if head_kind not in DEFAULT_TARGETS:
        raise ValueError(f"model.head.kind={head_kind!r} needs data.target (the dense modality to predict, e.g. normals)")
    return DEFAULT_TARGETS[head_kind]


def class_names(head_kind: str, data: dict[str, Any]) -> list[str] | None:
    """The class names of a transfer run's data: ``data.classes`` (a folder source's, recorded),
    else its source's when it fixes them (the synthetic scenes); None when unknown."""
    from multimae.data.sources import get_source

    if head_kind == "classification" and data.get("classes"):
        return list(data["classes"])
    return get_source(str(data.get("source", "synthetic"))).classes(head_kind)


def pretrain_classes(data: dict[str, Any], task: str, num_classes: int | None) -> list[str] | None:
    """Class names of a pretraining run's categorical output ``task`` (``data``: the run's data
    config): its source's, else those its pseudo-labelled folder dataset (``data.root``) records;
    None when unknown (or not ``num_classes`` of them)."""
    from multimae.data.errors import DataError
    from multimae.data.folder import read_meta
    from multimae.data.sources import get_source

    if not data:  # weights without a run config: nothing names the classes
        return None
    try:
        names = get_source(str(data.get("source", "synthetic"))).classes("segmentation")
        root = data.get("root")
        if names is None and root:
            names = read_meta(root).get("pseudolabel", {}).get(task, {}).get("classes")
    except (DataError, OSError, ValueError, AttributeError, KeyError):
        names = None
    return list(names) if names and len(names) == num_classes else None
