"""Inference on any images: :class:`Predictor` (Python) and :func:`predict_files` (``multimae predict``).

A run is either a fine-tuning run (classification, segmentation, depth or another dense head) or
a pretraining run (every decoder's prediction from the given inputs: cross-modal predictions).

Preprocessing is the run's evaluation transform (:class:`multimae.data.transfer.TransferTransform`,
the one ``multimae evaluate`` uses): dense tasks letterbox (longest side resized to the model's
image size, the rest padded), classification centre-crops. Predictions are mapped back to the
image's original size (EXIF orientation applied by :func:`multimae.data.codecs.open_image`, so
"original" means upright). ``window=True`` slides overlapping windows of the model's image size
over the image resized so its shorter side is the model size, averaging logits / values (the
mmseg ``slide`` inference).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.core.device import autocast, resolve_device, resolve_precision
from multimae.core.io import save_bytes_atomic
from multimae.data.codecs import _png_bytes, decode_image
from multimae.data.errors import DataError
from multimae.apps.inference import Counts, InputItem, open_items, run_batches
from multimae.apps.tiled import starts
from multimae.runs import RunOutput, load_run
from multimae.apps.predict_io import (ARRAY_DTYPES, DEFAULT_MAX_PIXELS, LowRes, check_identity, check_pixels,
                                      run_identity, write_array, write_colour, write_depth_png, write_ids, write_preview)

META_FILE = "multimae_predict.json"
CLS_FILE = "classification.jsonl"
DEPTH_PNG_SCALE = 1e-3  # metric depth PNGs: millimetres


#: how one predicted task is written (kind, classes, units, an image output's normalisation)
Output = RunOutput


@dataclass
class Predictor:
    """A trained run ready for inference. ``Predictor.from_run(path)``; ``predictor(images)`` with
    uint8 (3,H,W) tensors or paths / bytes -> one dict per image: task -> prediction at the
    image's size ((K,) logits; (K,H,W) logits; (C,H,W) values)."""

    model: torch.nn.Module
    kind: str  # "finetune" or "pretrain"
    inputs: list[Any]  # ModalitySpec of the inputs
    image_size: int
    transform: Any  # TransferTransform (letterbox or centre crop)
    outputs: dict[str, Output]
    run: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    window: bool = False

    @classmethod
    def from_run(cls, path: str | os.PathLike, device: str = "auto", precision: str = "auto",
                 inputs: Sequence[str] | None = None, window: bool = False) -> "Predictor":
        from multimae.data.transfer import TransferTransform

        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        run = load_run(path, dev)
        if run.kind == "probe":
            raise DataError(f"{run.checkpoint}: a linear probe run; predict takes fine-tuning or pretraining runs")
        names = [s.name for s in run.inputs]
        if run.kind == "finetune":
            if inputs is not None and list(inputs) != names:
                raise DataError(f"--inputs {','.join(inputs)}: the fine-tuning run {run.checkpoint} takes "
                                f"{','.join(names)}")
            specs = list(run.inputs)
        else:
            spatial = [s.name for s in run.inputs if s.is_spatial]
            chosen = list(inputs) if inputs is not None else spatial[:1]
            bad = [n for n in chosen if n not in names]
            if bad:
                raise DataError(f"--inputs {','.join(chosen)}: {bad} not among the run's inputs {spatial}")
            specs = [s for n in chosen for s in run.inputs if s.name == n]
        outs = {t: replace(o, classes=o.classes or ([str(i) for i in range(o.num_classes)] if o.num_classes else None))
                for t, o in run.outputs.items()}
        letterbox = any(o.kind != "classification" for o in outs.values())
        tf = TransferTransform(specs, "label", None, run.image_size, False, letterbox_eval=letterbox)
        return cls(run.model, run.kind, specs, run.image_size, tf, outs, str(run.checkpoint), dev, prec, window)

    # ----------------------------------------------------------------------------- forward
    def _forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad(), autocast(self.precision, self.device):
            if self.kind == "finetune":
                (task,) = self.outputs
                return {task: self.model(batch).float()}
            out = self.model(batch, compute_loss=False)
            return {t: out.preds[t].float() for t in self.outputs}

    def model_inputs(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The run's evaluation preprocessing of one raw sample (uint8 images)."""
        x = self.transform.transform_inputs(raw)
        return {s.key: x[s.key] for s in self.inputs}

    def predict_raw(self, raws: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Raw samples (modality key -> uint8 (C,H,W) / float dense) -> per sample, task ->
        prediction at the sample's size (logits or values; classification (K,)). Memory: C*H*W
        floats per dense task; :meth:`predict_lowres` keeps them at model resolution."""
        return [{t: p.full() if isinstance(p, LowRes) else p for t, p in r.items()}
                for r in self.predict_lowres(raws)]

    def predict_lowres(self, raws: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor | LowRes]]:
        """As :meth:`predict_raw`, dense predictions left at model resolution (:class:`LowRes`,
        brought to full size band by band when written)."""
        if self.window:
            return [self._slide(r) for r in raws]
        # every image becomes one (S, S) model input, whatever its size: one forward per batch
        xs = [self.model_inputs(r) for r in raws]
        preds = self._forward({k: torch.stack([x[k] for x in xs]) for k in xs[0]})
        return [{t: p[i].cpu() if p.ndim == 2 else self._unletterbox(p[i].cpu(), *_size(r)) for t, p in preds.items()}
                for i, r in enumerate(raws)]

    def _unletterbox(self, p: Tensor, h: int, w: int) -> LowRes:
        """(C,S,S) prediction of a letterboxed (h,w) image -> its (C,h,w) mapping."""
        # a centre crop (dense prediction of a classification run): none
        return LowRes(p, (h, w), (max(h, w),) * 2 if self.transform.letterbox else (h, w))

    def _slide(self, raw: dict[str, Tensor]) -> dict[str, Tensor | LowRes]:
        """Sliding-window inference: the image resized so its shorter side is the model size, windows
        of the model size with stride 2/3 of it, logits / values averaged, resized back."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if self.kind == "finetune" and next(iter(self.outputs.values())).kind == "classification":
            raise DataError("--window applies to dense predictions, not a classification run")
        h, w = _size(raw)
        S = self.image_size
        r = S / min(h, w)
        H, W = max(S, round(h * r)), max(S, round(w * r))
        full = {}  # the run's resize + normalisation (as PairedTransform), at (H, W)
        for s in self.inputs:
            x = TF.resize(raw[s.key] if s.kind == "image" else raw[s.key].float(), [H, W],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
            x = x.float() / 255.0 if s.kind == "image" and not x.is_floating_point() else x.float()
            full[s.key] = _normalise(x, s)
        stride = max(1, (2 * S) // 3)
        sums: dict[str, Tensor] = {}
        count = torch.zeros(1, H, W)
        for y0 in starts(H, S, stride):
            for x0 in starts(W, S, stride):
                crop = {k: v[None, :, y0:y0 + S, x0:x0 + S] for k, v in full.items()}
                for t, p in self._forward(crop).items():
                    p = p[0].cpu()
                    if p.shape[-2:] != (S, S):
                        p = F.interpolate(p[None], size=(S, S), mode="bilinear", align_corners=False)[0]
                    if t not in sums:
                        sums[t] = torch.zeros(p.shape[0], H, W)
                    sums[t][:, y0:y0 + S, x0:x0 + S] += p
                count[:, y0:y0 + S, x0:x0 + S] += 1
        return {t: LowRes(v / count, (h, w), (h, w)) for t, v in sums.items()}

    def __call__(self, images: Iterable[Any]) -> list[dict[str, Tensor]]:
        """rgb images (uint8 (3,H,W) tensors, paths or bytes) -> per image, task -> prediction
        (segmentation / dense: (K or C, H, W) at the image's upright size; classification: (K,) logits)."""
        if len(self.inputs) != 1:
            raise DataError(f"this predictor takes {[s.name for s in self.inputs]}; use predict_raw with a dict per sample")
        key = self.inputs[0].key
        raws = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                im = Path(im).read_bytes()
            if isinstance(im, (bytes, bytearray)):
                im = decode_image(bytes(im), self.inputs[0].channels, "image")
            raws.append({key: im})
        return self.predict_raw(raws)


def _normalise(x: Tensor, spec: Any) -> Tensor:
    """As the transforms: robust standardisation, else the spec's own normalisation (nodata 0)."""
    if spec.kind == "dense" and spec.standardize == "robust":
        from multimae.data.transforms import robust_standardize

        return robust_standardize(x)
    x = spec.normalize(x)
    return torch.nan_to_num(x, nan=0.0) if spec.is_raster else x


def _size(raw: dict[str, Tensor]) -> tuple[int, int]:
    v = next(iter(raw.values()))
    return int(v.shape[-2]), int(v.shape[-1])


# ---------------------------------------------------------------------------------- writing

def legend_png(classes: Sequence[str]) -> bytes:
    """A legend: one row per class, its colour and its name."""
    from PIL import Image, ImageDraw

    from multimae.evaluation.viz import palette

    row = 14
    im = Image.new("RGB", (180, row * len(classes) + 4), (255, 255, 255))
    d = ImageDraw.Draw(im)
    cols = (palette(max(len(classes), 1)) * 255).round().byte().numpy()
    for i, name in enumerate(classes):
        d.rectangle([2, 2 + i * row, 14, 12 + i * row], fill=tuple(int(c) for c in cols[i]))
        d.text((20, 2 + i * row), f"{i} {name}", fill=(0, 0, 0))
    return _png_bytes(np.asarray(im), compress_level=1)


def output_files(task: str, out: Output, name: str, arrays: str = "float32") -> list[str]:
    """The files written for one image and task (relative to the output directory); ``arrays``:
    ``none`` writes no ``.npy`` of a dense prediction."""
    if out.kind == "classification":
        return []
    if out.kind == "segmentation":
        return [f"{name}.{task}.png", f"{name}.{task}.color.png"]
    if out.kind == "depth":
        return [f"{name}.{task}.png", f"{name}.{task}.preview.png"]
    return ([f"{name}.{task}.npy"] if arrays != "none" else []) + [f"{name}.{task}.preview.png"]


def write_prediction(root: Path, task: str, out: Output, name: str, pred: Tensor | LowRes, topk: int = 5,
                     arrays: str = "float32") -> dict | None:
    """Write one task's prediction of one image (dense: at the image's size, band by band);
    returns the JSONL record of a classification."""
    if out.kind == "classification":
        assert isinstance(pred, Tensor)
        prob = pred.float().softmax(-1)
        k = min(topk, prob.numel())
        p, i = prob.topk(k)
        return {"image": name, "top": [{"class": int(c), "name": out.classes[int(c)] if out.classes else str(int(c)),
                                        "prob": float(q)} for q, c in zip(p, i)]}
    if isinstance(pred, Tensor):  # a full-size (C,H,W) prediction
        pred = LowRes(pred, tuple(pred.shape[-2:]), tuple(pred.shape[-2:]))
    files = [root / f for f in output_files(task, out, name, arrays)]
    if out.kind == "segmentation":
        n = len(out.classes or []) or pred.channels
        ids = write_ids(files[0], pred, n)
        write_colour(files[1], ids, n)
    elif out.kind == "depth":
        write_depth_png(files[0], pred, DEPTH_PNG_SCALE)
        write_preview(files[1], pred)
    else:
        if arrays != "none":
            write_array(files[0], pred, arrays)
        write_preview(files[-1], pred, out.mean, out.std)
    return None


@dataclass
class PredictReport(Counts):
    """What ``predict_files`` did (:class:`~multimae.apps.inference.Counts`)."""

    @property
    def predicted(self) -> int:
        return self.processed


def resolve_arrays(arrays: str, run_kind: str) -> str:
    """``auto``: float16 ``.npy`` of a fine-tuning run's dense head, none for a pretraining run
    (its reconstructions get previews only)."""
    if arrays not in ("auto", "none", *ARRAY_DTYPES):
        raise DataError(f"--arrays {arrays}: expected auto, none, float16 or float32")
    if arrays == "auto":
        return "float16" if run_kind == "finetune" else "none"
    return arrays


def predict_files(predictor: Predictor, input: str | os.PathLike | Sequence[str], out: str | os.PathLike,
                  batch_size: int = 8, progress: bool = True, topk: int = 5,
                  pairs: dict[str, str | os.PathLike] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  arrays: str = "auto") -> PredictReport:
    """Predict every image of ``input`` (a folder, image files, or .tar shards: paths, brace
    patterns, comma lists) into ``out``; resumable (finished images are skipped), bad files
    (unreadable, over ``max_pixels``, a duplicate output name) reported, skipped and counted
    (the pipeline of :mod:`multimae.apps.inference`).

    Outputs mirror each input's relative path (``x/a.png`` -> ``OUT/x/a.<task>.png``; a dataset's
    ``rgb/<class>/<name>`` -> ``OUT/<class>/<name>...``). ``OUT/multimae_predict.json`` records the
    run's identity; a folder holding another run's predictions is refused. ``arrays``: dtype of
    dense ``.npy`` outputs (:func:`resolve_arrays`).

    The first input modality is read from ``input``; every other one from a paired directory
    (``pairs[name]``; default for a dataset's ``rgb/`` input: its sibling ``<name>/``) holding a
    file of the same relative path and stem (any extension the modality can be read from)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    arrays = resolve_arrays(arrays, predictor.kind)
    pairs = {k: Path(v) for k, v in (pairs or {}).items()}
    root = Path(out)
    items, total, mirror = open_items(input)
    identity = run_identity(predictor, window=predictor.window, arrays=arrays)
    check_identity(root / META_FILE, identity)
    root.mkdir(parents=True, exist_ok=True)
    cls_path = root / CLS_FILE
    done_cls = {json.loads(line)["image"] for line in cls_path.read_text().splitlines() if line.strip()} \
        if cls_path.exists() else set()
    report = PredictReport()
    _write_meta(root, predictor, report, identity, arrays)  # the identity, before the first output
    spec0 = predictor.inputs[0]

    def name_of(it: InputItem) -> str:
        return (it.rel or (it.name if it.cls == "all" else f"{it.cls}/{it.name}")) if mirror else it.name

    def done(it: InputItem, name: str) -> bool:
        return all(name in done_cls if o.kind == "classification"
                   else all((root / f).exists() for f in output_files(t, o, name, arrays))
                   for t, o in predictor.outputs.items())

    def decode(it: InputItem) -> dict[str, Tensor]:
        data = it.read()
        check_pixels(data, max_pixels, f"image {it.where}")
        raw = {spec0.key: decode_image(data, spec0.channels, f"image {it.where}")}
        for sp in predictor.inputs[1:]:
            raw[sp.key] = _paired(sp, it, pairs)
        return raw

    def process(batch: Sequence[tuple[InputItem, str, dict[str, Tensor]]]) -> None:
        records = []
        for (_, name, _), preds in zip(batch, predictor.predict_lowres([raw for _, _, raw in batch])):
            for t, p in preds.items():
                rec = write_prediction(root, t, predictor.outputs[t], name, p, topk, arrays)
                if rec is not None:
                    records.append(rec)
        if records:
            with open(cls_path, "a") as f:  # one line per image, appended after its batch
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())

    def skipped(err: DataError) -> None:
        print(f"skipped: {err}", flush=True)

    try:
        run_batches(items, total, name=name_of, done=done, decode=decode, process=process, on_bad=skipped,
                    batch_size=batch_size, desc="predict", progress=progress, counts=report)
    finally:
        _write_meta(root, predictor, report, identity, arrays)
    return report


def _paired(spec: Any, item: InputItem, pairs: dict[str, Path]) -> Tensor:
    """Modality ``spec`` of ``item`` from its paired directory (see :func:`predict_files`)."""
    from multimae.data.codecs import EXTS, decode_field, scale_for
    from multimae.data.folder import read_meta

    src = Path(item.where)
    layout = src.parent.parent.name == "rgb"  # a dataset layout: <split>/rgb/<class>/<name>.<ext>
    if spec.name in pairs:
        pdir = pairs[spec.name]
        # a layout: <class>/<name>; a folder or files: the path the output name mirrors; a shard sample: its stem
        rel = Path(src.parent.name) / src.stem if layout else Path(item.rel or src.stem)
    elif layout:
        pdir, rel = src.parent.parent.parent / spec.name, Path(src.parent.name) / src.stem
    else:
        raise DataError(f"image {item.where}: input {spec.name!r} needs a paired directory (--pair {spec.name}=DIR)")
    f = next((c for e in EXTS[spec.kind] if (c := pdir / f"{rel}.{e}").is_file()), None)
    if f is None:
        raise DataError(f"image {item.where}: no paired {spec.name} file {pdir / rel}.{{{','.join(EXTS[spec.kind])}}}")
    meta = next((m for d in (pdir, pdir.parent, pdir.parent.parent) if (m := read_meta(d))), {})
    scale = scale_for(meta.get("png_scale"), spec.key)  # as the folder datasets read it
    v = decode_field(f.read_bytes(), f.suffix[1:], spec, scale, f"{spec.name} {f}")
    assert isinstance(v, Tensor)
    return v


def _write_meta(root: Path, predictor: Predictor, report: PredictReport, identity: dict[str, Any],
                arrays: str) -> None:
    tasks = {}
    for t, o in predictor.outputs.items():
        info: dict[str, Any] = {"kind": o.kind, **({"classes": o.classes} if o.classes else {})}
        if o.kind == "depth":
            info.update(png_scale=DEPTH_PNG_SCALE, units="the run's depth units (metres for metric data)",
                        files="<name>.%s.png (16-bit, value * png_scale), <name>.%s.preview.png" % (t, t))
        elif o.kind == "dense":
            info["files"] = (f"<name>.{t}.npy ({arrays} (C,H,W)), " if arrays != "none" else "") + \
                f"<name>.{t}.preview.png"
            if o.units:
                info["units"] = o.units + (" (per-image standardised, not metres)" if o.units.startswith("robust") else "")
        elif o.kind == "segmentation":
            info["files"] = f"<name>.{t}.png (class ids), <name>.{t}.color.png; legend {t}.legend.png"
            save_bytes_atomic(root / f"{t}.legend.png", legend_png(o.classes or []))
        else:
            info["files"] = f"{CLS_FILE} (top-k per image)"
        tasks[t] = info
    meta = {"run": predictor.run, "identity": identity, "run_kind": predictor.kind, "inputs": [s.name for s in predictor.inputs],
            "image_size": predictor.image_size, "window": predictor.window,
            "preprocessing": "sliding window" if predictor.window else
            ("letterbox" if predictor.transform.letterbox else "centre crop"),
            "tasks": tasks, "png_scale": {t: DEPTH_PNG_SCALE for t, o in predictor.outputs.items() if o.kind == "depth"},
            "counts": {"predicted": report.predicted, "already_done": report.already_done, "bad": report.bad}}
    save_bytes_atomic(root / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
