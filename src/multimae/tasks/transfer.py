"""What fine-tuning and linear probing share: the transfer model built from a run's ``init`` with
the config completed from it, the default run name, and the type of a dataset injection."""
from __future__ import annotations

import logging

from dataclasses import replace
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from multimae.core.modalities import ModalitySpec
from multimae.data.errors import DataError
from multimae.data.sources import get_source
from multimae.tasks.finetune_config import FinetuneConfig, target_of
from multimae.checkpoint.convert import ConversionReport
from multimae.model.transfer import TransferModel, build_transfer_model

#: ``datasets(split, train) -> map-style dataset``: raw (untransformed) downstream samples that
#: replace the configured source's (e.g. a benchmark's own scenes).
Datasets = Callable[[str, bool], Dataset]


def default_run_name(cfg: FinetuneConfig, prefix: str = "ft") -> str:
    """``<prefix>-<head kind>-<inputs>-<init name>``, e.g. ``ft-classification-rgb-synthetic-tiny``."""
    init = "scratch" if cfg.init in ("", "scratch") else Path(cfg.init.rstrip("/")).name.removesuffix(".pth")
    return f"{prefix}-{cfg.model.head.kind}-{'+'.join(cfg.model.inputs)}-{init}"


def _folder_classes(cfg: FinetuneConfig) -> list[str] | None:
    """``data.classes``, else a folder source's class names for a classification head (the
    training split's class directories, or those ``multimae_data.json`` records)."""
    d = cfg.data
    if d.classes or cfg.model.head.kind != "classification" or d.source != "folder" or not d.root:
        return d.classes
    from multimae.data.folder import UNLABELLED, class_directories, read_meta

    return list(read_meta(d.root).get("classes") or [
        c for c in class_directories(d.root, d.train_split, cfg.model.inputs[0]) if c != UNLABELLED])


def dense_target_spec(cfg: FinetuneConfig) -> "ModalitySpec | None":
    """The spec of a dense head's target (its channels, ``unit_vectors``), or None for other
    heads or a target the config cannot name yet."""
    from multimae.data.transfer import target_spec

    if cfg.model.head.kind != "dense":
        return None
    enc = cfg.model.encoder
    try:
        return target_spec(target_of(cfg), "dense", None, enc.modalities if enc is not None else None)
    except (KeyError, ValueError):
        return None


def prepare(cfg: FinetuneConfig, init: str | None = None) -> tuple[TransferModel, ConversionReport, FinetuneConfig]:
    """Build the transfer model from ``init`` (default ``cfg.init``) and return the config
    completed with what the model fixed (encoder architecture read from the init, number of
    classes of a source with fixed classes, run name): a copy, ``cfg`` is not changed."""
    head = cfg.model.head
    cfg = replace(cfg, data=replace(cfg.data, classes=_folder_classes(cfg)))
    if head.num_classes is None:
        names = cfg.data.classes if head.kind == "classification" and cfg.data.classes else \
            get_source(cfg.data.source).classes(head.kind)
        if names is not None:
            head = replace(head, num_classes=len(names))
    elif head.kind == "classification" and cfg.data.classes and head.num_classes != len(cfg.data.classes):
        c, d = cfg.data.classes, cfg.data
        where = "data.classes has" if d.source != "folder" else \
            f"{d.root}/{d.train_split}/{cfg.model.inputs[0]}: the data has"
        raise DataError(f"{where} {len(c)} class directories ({', '.join(c[:5])}{' ...' if len(c) > 5 else ''}) but "
                        f"model.head.num_classes={head.num_classes}; set model.head.num_classes={len(c)} "
                        f"(or null: taken from the data)")
    target = dense_target_spec(cfg)
    if target is not None and cfg.model.head.out_channels == 1 and target.channels != 1:
        head = replace(head, out_channels=target.channels)  # e.g. normals: 3 (a dense head defaults to 1)
    cfg = replace(cfg, model=replace(cfg.model, head=head))
    model, report = build_transfer_model(cfg.model, cfg.init if init is None else init)
    size = model.encoder_config.image_size
    if cfg.model.encoder is None and cfg.data.image_size != size:  # the architecture came from the init
        logging.getLogger("multimae").warning(
            "training at data.image_size=%d px, but the init was trained at %d px (its position tables are "
            "resampled); set data.image_size=%d to keep its size", cfg.data.image_size, size, size)
    cfg = replace(cfg, model=replace(cfg.model, encoder=model.encoder_config))
    if not cfg.train.run_name:
        cfg = replace(cfg, train=replace(cfg.train, run_name=default_run_name(cfg)))
    return model, report, cfg
