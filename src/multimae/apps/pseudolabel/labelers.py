"""Labellers: models that turn a batch of rgb images into pseudo-label maps.

A labeller is anything with the :class:`Labeler` protocol: ``tasks`` (the keys it produces),
``info()`` (what to record beside the data) and ``__call__(images)``: a list of uint8 (3,H,W)
images, each of its own size, -> ``{task: [map per image]}`` with every map at its image's size:
``depth`` float32 (1,H,W) (> 0 valid, 0 invalid), ``semseg`` int64 (H,W) class ids.

Built in: Hugging Face ``transformers`` depth models (``AutoModelForDepthEstimation``: DPT,
Depth Anything, ...), universal segmentation models (Mask2Former, OneFormer; COCO-panoptic models
give the 133 COCO panoptic ids), plain semantic-segmentation models (their own label set), and a
MultiMAE checkpoint of this library (depth / semseg predicted from rgb). ``transformers`` is
imported only when a Hugging Face labeller is built (``pip install 'multimae[pseudolabel]'``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.core.device import autocast, resolve_device, resolve_precision
from multimae.apps.pseudolabel.labels import LabelMap, build_label_map, coco_panoptic_names, panoptic_to_semantic

UNIVERSAL_TYPES = ("mask2former", "oneformer", "maskformer")
METRIC_DEPTH_TYPES = ("zoedepth",)


@runtime_checkable
class Labeler(Protocol):
    """Image batch -> dict of maps. See the module doc for shapes; maps come back at each image's size."""

    tasks: tuple[str, ...]

    def info(self) -> dict[str, dict[str, Any]]:
        """Per task: JSON-serialisable facts recorded in ``multimae_data.json`` (model, classes...)."""
        ...

    def __call__(self, images: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        ...


class LabelerError(ValueError):
    """A labeller cannot be built from what it was given (the message names the path)."""


# --- shared helpers ------------------------------------------------------------------------------


def resize_map(x: Tensor, size: tuple[int, int], categorical: bool) -> Tensor:
    """(C,h,w) or (h,w) -> the same at ``size``: bilinear for values, nearest for class ids."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = x[None] if x.ndim == 3 else x[None, None]
    if categorical:
        y = F.interpolate(y.float(), size=size, mode="nearest-exact").to(x.dtype)
    else:
        y = F.interpolate(y.float(), size=size, mode="bilinear", align_corners=False)
    return y[0] if x.ndim == 3 else y[0, 0]


def upsampled_argmax(scores: Tensor, size: tuple[int, int], chunk: int = 16) -> Tensor:
    """argmax over classes of ``scores`` (K,h,w) resized bilinearly to ``size``: int64 (H,W).

    Resizing is per channel, so doing it ``chunk`` classes at a time gives the same result while
    holding ``chunk`` full-size maps instead of K (133 x 12 MP would be 6 GB).
    """
    best = torch.full(size, float("-inf"))
    idx = torch.zeros(size, dtype=torch.int64)
    for c0 in range(0, scores.shape[0], chunk):
        up = F.interpolate(scores[None, c0:c0 + chunk].float(), size=size, mode="bilinear", align_corners=False)[0]
        m, a = up.max(0)
        better = m > best
        best = torch.where(better, m, best)
        idx = torch.where(better, a + c0, idx)
    return idx


def _valid_box(pixel_mask: Tensor | None, shape: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the un-padded top-left region of a processed image (its pixel_mask, 1 = image)."""
    if pixel_mask is None:
        return shape
    rows = pixel_mask.bool().any(-1).nonzero()
    cols = pixel_mask.bool().any(-2).nonzero()
    return (int(rows.max()) + 1 if rows.numel() else shape[0], int(cols.max()) + 1 if cols.numel() else shape[1])


def _crop_to_valid(x: Tensor, valid: tuple[int, int], full: tuple[int, int]) -> Tensor:
    """Crop an output grid (..., oh, ow) covering a padded input ``full`` to the part over ``valid``."""
    oh, ow = x.shape[-2:]
    h = max(1, round(valid[0] * oh / full[0]))
    w = max(1, round(valid[1] * ow / full[1]))
    return x[..., :h, :w]


def _hf_config(path: str | Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise LabelerError(f"{path}: not a Hugging Face model directory (no config.json) nor a multimae checkpoint "
                           "(no meta.json)")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise LabelerError(f"{cfg}: unreadable ({e})") from None


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise LabelerError("Hugging Face labellers need transformers: pip install 'multimae[pseudolabel]'") from None
    transformers.utils.logging.disable_progress_bar()  # one bar per weight file is noise next to ours
    return transformers


class _HFBase:
    """Runs a Hugging Face processor per image and the model on groups of same-shape inputs."""

    def __init__(self, path: str | Path, device: str = "auto", precision: str = "auto",
                 processor_kwargs: dict | None = None) -> None:
        self.path = Path(path)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.processor_kwargs = dict(processor_kwargs or {})
        self.tf = _require_transformers()
        self.config = _hf_config(path)

    def _inputs(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for img in images:
            arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
            enc = self.processor(images=[arr], return_tensors="pt", **self.processor_kwargs)
            out.append({k: v for k, v in enc.items() if torch.is_tensor(v)})
        return out

    @torch.inference_mode()
    def _run(self, images: Sequence[Tensor]) -> list[tuple[Any, int, tuple[int, int], tuple[int, int]]]:
        """``(model output, index in its group, (h, w) of the image in its processed input, that
        input's (h, w))`` per image, in order."""
        inputs = self._inputs(images)
        groups: dict[tuple, list[int]] = {}
        for i, enc in enumerate(inputs):
            groups.setdefault(tuple(enc["pixel_values"].shape[1:]), []).append(i)
        results: list = [None] * len(images)
        for idx in groups.values():
            batch = {k: torch.cat([inputs[i][k] for i in idx]).to(self.device) for k in inputs[idx[0]]}
            with autocast(self.precision, self.device):
                out = self.model(**batch)
            for j, i in enumerate(idx):
                full = tuple(inputs[i]["pixel_values"].shape[-2:])
                results[i] = (out, j, _valid_box(inputs[i].get("pixel_mask", [None])[0], full), full)
        return results


# --- depth ---------------------------------------------------------------------------------------


class HFDepthLabeler(_HFBase):
    """Depth from a ``transformers`` depth-estimation model directory (DPT, Depth Anything, ...).

    ``units``: ``metric`` (the model predicts metres), ``relative`` (affine-invariant depth or
    disparity), or ``auto`` (metric when the config says so: Depth Anything ``depth_estimation_type:
    metric``, ZoeDepth). Predictions are resized bilinearly to each image's size.
    """

    tasks = ("depth",)

    def __init__(self, path: str | Path, device: str = "auto", precision: str = "auto", units: str = "auto",
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(path, device, precision, processor_kwargs)
        self.processor = self.tf.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = self.tf.AutoModelForDepthEstimation.from_pretrained(str(path), local_files_only=True)
        self.model.to(self.device).eval()
        if units not in ("auto", "metric", "relative"):
            raise ValueError(f"depth units must be auto, metric or relative, got {units!r}")
        if units == "auto":
            metric = (self.config.get("depth_estimation_type") == "metric"
                      or self.config.get("model_type") in METRIC_DEPTH_TYPES)
            units = "metric" if metric else "relative"
        self.units = units

    def info(self) -> dict[str, dict[str, Any]]:
        return {"depth": {"labeler": "transformers-depth", "model": str(self.path),
                          "model_type": self.config.get("model_type"), "units": self.units}}

    def __call__(self, images: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        maps = []
        for img, (out, j, valid, full) in zip(images, self._run(images)):
            pred = out.predicted_depth[j].float()
            pred = _crop_to_valid(pred if pred.ndim == 3 else pred[None], valid, full)
            maps.append(resize_map(pred.cpu(), tuple(img.shape[-2:]), categorical=False))
        return {"depth": maps}


# --- segmentation --------------------------------------------------------------------------------


class HFSegmentationLabeler(_HFBase):
    """Semantic segmentation from a ``transformers`` model directory.

    Universal models (Mask2Former, MaskFormer, OneFormer): per-pixel class scores are the mask
    probabilities weighted by the query class probabilities (``mode="semantic"``, every pixel gets
    a class), or the processor's panoptic post-processing (``mode="panoptic"``; pixels in no segment
    take the semantic class). Their labels are mapped to the COCO panoptic 133 ids when every label
    name is a COCO panoptic category (``label_set="auto"``). Other models
    (``AutoModelForSemanticSegmentation``: SegFormer, UperNet, ...) give per-pixel logits in their
    own label set. Class scores are resized bilinearly to each image's size before the argmax.
    """

    tasks = ("semseg",)

    def __init__(self, path: str | Path, device: str = "auto", precision: str = "auto", label_set: str = "auto",
                 mode: str = "semantic", processor_kwargs: dict | None = None) -> None:
        super().__init__(path, device, precision, processor_kwargs)
        tf = self.tf
        self.model_type = self.config.get("model_type", "?")
        self.universal = self.model_type in UNIVERSAL_TYPES
        if mode not in ("semantic", "panoptic"):
            raise ValueError(f"segmentation mode must be semantic or panoptic, got {mode!r}")
        if mode == "panoptic" and not self.universal:
            raise LabelerError(f"{path}: panoptic mode needs a universal model (Mask2Former / OneFormer), "
                               f"not {self.model_type!r}")
        self.mode = mode
        if self.model_type == "oneformer":
            self.processor = tf.AutoProcessor.from_pretrained(str(path), local_files_only=True)
            self.processor_kwargs.setdefault("task_inputs", [mode])
        else:
            self.processor = tf.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        auto = tf.AutoModelForUniversalSegmentation if self.universal else tf.AutoModelForSemanticSegmentation
        self.model = auto.from_pretrained(str(path), local_files_only=True)
        self.model.to(self.device).eval()
        try:
            self.label_map: LabelMap = build_label_map(self.model.config.id2label, label_set)
        except ValueError as e:
            raise LabelerError(f"{path}: {e}") from None

    def info(self) -> dict[str, dict[str, Any]]:
        return {"semseg": {"labeler": "transformers-segmentation", "model": str(self.path),
                           "model_type": self.model_type, "mode": self.mode, "label_set": self.label_map.label_set,
                           "num_classes": len(self.label_map.names), "classes": self.label_map.names}}

    def _class_scores(self, out: Any, j: int) -> Tensor:
        """(K, h, w) per-pixel class scores of image ``j`` of a batch, in model label ids."""
        if self.universal:
            cls = out.class_queries_logits[j].float().softmax(-1)[:, :-1]  # drop the "no object" class
            masks = out.masks_queries_logits[j].float().sigmoid()
            return torch.einsum("qk,qhw->khw", cls, masks)
        return out.logits[j].float()

    def __call__(self, images: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        maps = []
        for img, (out, j, valid, full) in zip(images, self._run(images)):
            size = tuple(img.shape[-2:])
            scores = _crop_to_valid(self._class_scores(out, j), valid, full).cpu()
            sem = self.label_map(upsampled_argmax(scores, size))
            if self.mode == "panoptic":
                sem = self._panoptic(out, j, valid, full, size, sem)
            maps.append(sem)
        return {"semseg": maps}

    def _panoptic(self, out: Any, j: int, valid: tuple[int, int], full: tuple[int, int], size: tuple[int, int],
                  fill: Tensor) -> Tensor:
        from types import SimpleNamespace

        one = SimpleNamespace(class_queries_logits=out.class_queries_logits[j:j + 1].float(),
                              masks_queries_logits=_crop_to_valid(out.masks_queries_logits[j:j + 1].float(), valid, full))
        res = self.processor.post_process_panoptic_segmentation(one, target_sizes=[size], label_ids_to_fuse=set())[0]
        return panoptic_to_semantic(res["segmentation"].cpu(), res["segments_info"], self.label_map, fill)


# --- a MultiMAE checkpoint ----------------------------------------------------------------------


class MultiMAELabeler:
    """Depth and/or semseg predicted from rgb by a pretrained MultiMAE of this library.

    Every image is resized (bilinear, antialiased) to the model's ``image_size`` square, encoded
    with all rgb tokens visible, and the requested decoders' outputs are resized back (depth
    bilinear; semseg: argmax, then nearest). Depth is in the standardised units the model was
    trained on (``units: relative``).
    """

    def __init__(self, path: str | Path, tasks: Sequence[str] = ("depth", "semseg"), device: str = "auto",
                 precision: str = "auto", image_size: int | None = None) -> None:
        from multimae.runs import load_run

        self.path = Path(path)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        run = load_run(path, self.device)
        if run.kind != "pretrain":
            raise LabelerError(f"{path}: a {run.kind} run; a MultiMAE labeller is a pretraining run (its decoders "
                               "predict depth / semseg)")
        self.model, self.ckpt = run.model, str(run.checkpoint)
        self.trained_on = str(getattr(self.model, "provenance", {}).get("training", {}).get("data", ""))
        outs = self.model.output_specs
        missing = [t for t in tasks if t not in outs]
        if missing:
            raise LabelerError(f"{path}: the model has no {missing} output (outputs: {sorted(outs)})")
        self.tasks = tuple(tasks)
        self.rgb = next((s for s in self.model.input_specs.values() if s.kind == "image" and s.key == "rgb"), None)
        if self.rgb is None:
            raise LabelerError(f"{path}: the model has no rgb input (inputs: {sorted(self.model.input_specs)})")
        self.size = int(image_size or self.model.config.image_size)
        if self.size % self.model.config.patch_size:
            raise ValueError(f"image_size {self.size} is not a multiple of the patch size {self.model.config.patch_size}")

    def _class_names(self, task: str) -> list[str]:
        n = self.model.output_specs[task].num_classes
        if n == 133:
            return coco_panoptic_names()
        if self.trained_on.startswith("built-in synthetic"):
            from multimae.data.synthetic import SEMSEG_CLASSES

            if n == len(SEMSEG_CLASSES):
                return list(SEMSEG_CLASSES)
        return [f"class_{i}" for i in range(n)]

    def info(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for t in self.tasks:
            spec = self.model.output_specs[t]
            out[t] = {"labeler": "multimae", "model": str(self.ckpt), "trained_on": self.trained_on,
                      "image_size": self.size}
            if spec.kind == "categorical":
                names = self._class_names(t)
                out[t].update(num_classes=len(names), classes=names,
                              label_set="coco-panoptic-133" if len(names) == 133 else "own")
            else:
                out[t]["units"] = "relative"
        return out

    @torch.inference_mode()
    def __call__(self, images: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        x = torch.cat([F.interpolate(img[None].float() / 255.0, size=(self.size, self.size), mode="bilinear",
                                     antialias=True, align_corners=False) for img in images])
        x = self.rgb.normalize(x).to(self.device)
        with autocast(self.precision, self.device):
            preds = self.model({"rgb": x}, tasks=list(self.tasks), compute_loss=False).preds
        out: dict[str, list[Tensor]] = {}
        for t in self.tasks:
            categorical = self.model.output_specs[t].kind == "categorical"
            p = preds[t].float().cpu()
            p = p.argmax(1) if categorical else p
            out[t] = [resize_map(p[i], tuple(img.shape[-2:]), categorical) for i, img in enumerate(images)]
        return out


# --- building from a path -----------------------------------------------------------------------


def is_multimae_checkpoint(path: str | Path) -> bool:
    """A run, checkpoint or ``save_pretrained`` directory of this library (not a Hugging Face model dir)."""
    p = Path(path)
    if (p / "meta.json").is_file() or (p / "checkpoints").is_dir() or (p.name == "checkpoints" and p.is_dir()):
        return True
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "multimae"
    except (OSError, ValueError, AttributeError):
        return False


def load_labeler(path: str | Path, task: str, device: str = "auto", precision: str = "auto",
                 **options: Any) -> Labeler:
    """The labeller for ``task`` (``depth`` or ``semseg``) stored at ``path``: a MultiMAE run /
    checkpoint directory, or a Hugging Face model directory (``config.json`` + weights + processor).

    options: ``units`` (depth), ``label_set`` and ``mode`` (semseg), ``image_size`` (MultiMAE).
    """
    p = Path(path)
    if not p.is_dir():
        raise LabelerError(f"{task} labeller {p}: not a directory")
    if task not in ("depth", "semseg"):
        raise ValueError(f"task must be depth or semseg, got {task!r}")
    if is_multimae_checkpoint(p):
        return MultiMAELabeler(p, (task,), device, precision, image_size=options.get("image_size"))
    if task == "depth":
        return HFDepthLabeler(p, device, precision, units=options.get("units", "auto"))
    return HFSegmentationLabeler(p, device, precision, label_set=options.get("label_set", "auto"),
                                 mode=options.get("mode", "semantic"))
