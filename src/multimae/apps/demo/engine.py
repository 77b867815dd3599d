"""The demo's model side, free of any web code: samples, masks, edits and predictions.

A :class:`DemoEngine` holds a loaded MultiMAE and a bounded in-memory store of input samples.
A sample is the model-ready tensor of every spatial input modality (no batch dimension) plus,
per modality, where it came from: ``true`` (a synthetic scene's exact maps or a dataset file),
``uploaded``, ``predicted from rgb`` (a missing modality filled in by the model itself from the
full rgb image) or ``edited``. Samples are immutable: an edit makes a new one, so concurrent
requests never see each other's half-done work. Model calls are serialised by one lock.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from multimae.apps.demo.errors import DemoError, short
from multimae.apps.demo.images import (
    class_colors, decode_upload, patch_mask, png_data_url, prediction_image, set_class, shift_hue, show,
)
from multimae.core.device import autocast, resolve_precision
from multimae.core.masking import MaskPlan, dirichlet_plan
from multimae.core.modalities import ModalitySpec
from multimae.data.errors import DataError

SYNTHETIC_KEYS = ("rgb", "depth", "semseg", "normals")  # what a built-in synthetic scene provides
MAX_SCENE_INDEX = 10**9


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000  # checked from the image header, before decoding
    max_side: int = 1024  # uploads are shrunk to this before the model's resize + centre crop
    max_samples: int = 128  # samples kept in memory (least recently used dropped): ~0.8 MB each at 224 px


@dataclass(frozen=True)
class Sample:
    """Model-ready tensors by batch key, each without a batch dimension, and their origins."""

    tensors: dict[str, Tensor]
    origin: dict[str, str]
    title: str
    pad: dict[str, Tensor] = field(default_factory=dict)  # text: (L,) bool, True = padding
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class DemoEngine:
    """Samples, masks, edits and predictions for one model.

    Args:
        model: a MultiMAE (put in eval mode).
        image_size: side of the square model input (the run's ``data.image_size``).
        default_visible, default_alpha: the run's masking budget and Dirichlet concentration.
        folder: optional ``(root, split)`` of a folder dataset to pick samples from.
        scene_seed: stream of the synthetic scenes offered (a run's held-out scenes are
            ``train.seed + 10_000``, the stream its end-of-run evaluation uses).
        precision: ``auto``, ``fp32`` or ``bf16`` (autocast) for the model call.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, default_visible: int = 32, default_alpha: float = 1.0,
                 folder: tuple[str | Path, str] | None = None, precision: str = "auto",
                 limits: Limits = Limits(), class_names: Sequence[str] | None = None, scene_seed: int = 0,
                 tokenizer: Any = None, text_ratio: float = 0.75) -> None:
        self.model = model.eval()
        self.patch = model.config.patch_size
        if image_size % self.patch:
            raise DemoError(f"image size {image_size} is not a multiple of the patch size {self.patch}")
        self.image_size, self.limits = image_size, limits
        self.inputs: dict[str, ModalitySpec] = {n: s for n, s in model.input_specs.items() if s.is_spatial}
        self.tasks: dict[str, ModalitySpec] = {n: s for n, s in model.output_specs.items() if s.is_spatial}
        if not self.inputs or not self.tasks:
            raise DemoError("the demo needs a model with an image input and an image output")
        self.source = next((s for s in self.inputs.values() if s.kind == "image" and s.channels == 3),
                           next(iter(self.inputs.values())))
        self.grid = (image_size // self.patch, image_size // self.patch)
        self._n_tokens = self.grid[0] * self.grid[1]  # patches per modality
        self.default_visible, self.default_alpha = default_visible, default_alpha
        self.device = next(model.parameters()).device
        try:
            self.precision = resolve_precision(precision, self.device)
        except ValueError as e:
            raise DemoError(str(e)) from None
        self.class_names = list(class_names) if class_names else None
        self.scene_seed = scene_seed
        self._lock = threading.Lock()  # one model call at a time
        self._store: OrderedDict[str, Sample] = OrderedDict()
        self._store_lock = threading.Lock()
        self.folder = self._open_folder(*folder) if folder else None
        self.last_ms: float | None = None
        # M3AE: a text input (the caption) and text tasks; words are tokens, shown and masked one by one
        texts = [s for s in model.input_specs.values() if s.kind == "text"]
        self.text: ModalitySpec | None = texts[0] if texts else None
        self.text_tasks: dict[str, ModalitySpec] = {n: s for n, s in model.output_specs.items() if s.kind == "text"}
        self.text_ratio = text_ratio
        self.text_encoder = None
        if self.text is not None:
            from multimae.data.tokenizers import TextEncoder, default_synthetic_tokenizer

            self.text_encoder = TextEncoder(tokenizer or default_synthetic_tokenizer(), max_len=self.text.max_len)

    # ------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        """What the page needs to draw itself (JSON-serialisable)."""
        def desc(s: ModalitySpec) -> dict[str, Any]:
            d: dict[str, Any] = {"name": s.name, "kind": s.kind, "key": s.key}
            if s.kind == "categorical":
                names = self.class_names if self.class_names and len(self.class_names) == s.num_classes else None
                d["classes"] = [{"id": i, "name": names[i] if names else f"class {i}", "color": c}
                                for i, c in enumerate(class_colors(s.num_classes))]
            d["edit"] = "hue" if s.kind == "image" and s.channels == 3 else "class" if s.kind == "categorical" else None
            return d

        return {
            "inputs": [desc(s) for s in self.inputs.values()], "outputs": [desc(s) for s in self.tasks.values()],
            "text": ({"name": self.text.name, "max_len": self.text.max_len, "ratio": self.text_ratio,
                      "outputs": list(self.text_tasks)} if self.text is not None else None),
            "source_modality": self.source.name, "grid": list(self.grid), "patch_size": self.patch,
            "image_size": self.image_size, "tokens": len(self.inputs) * self._n_tokens,
            "budget": self.default_visible, "alpha": self.default_alpha, "sources": self.sources,
            "folder_size": len(self.folder[0]) if self.folder else 0, "precision": self.precision,
            "device": str(self.device), "threads": torch.get_num_threads(),
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                       "max_side": self.limits.max_side},
        }

    @property
    def sources(self) -> list[str]:
        """Where inputs can come from: ``synthetic`` (when the source modality is rgb),
        ``folder`` (with a folder dataset), ``upload``."""
        out = ["synthetic"] if self.source.key == "rgb" else []
        return out + (["folder"] if self.folder is not None else []) + ["upload"]

    def describe(self, sample: Sample) -> dict[str, Any]:
        """A sample as the page shows it: every input modality's image and origin."""
        out = {"id": sample.id, "title": sample.title,
               "inputs": {n: {"image": png_data_url(show(s, sample.tensors[s.key])), "origin": sample.origin[s.key]}
                          for n, s in self.inputs.items() if s.key in sample.tensors}}
        t = self.text
        if t is not None:
            out["text"] = {"name": t.name, "tokens": self._words(sample),
                           "caption": self._caption(sample.tensors[t.key], sample.pad[t.key]) if t.key in sample.tensors
                           else "", "origin": sample.origin.get(t.key, "none")}
        return out

    # ------------------------------------------------------------------ text (M3AE)
    def _words(self, sample: Sample) -> list[str]:
        """The caption's tokens as strings (its real positions, padding left out)."""
        if self.text is None or self.text.key not in sample.tensors:
            return []
        ids, pad = sample.tensors[self.text.key], sample.pad[self.text.key]
        tok = self.text_encoder.tokenizer
        return [tok.id_to_token(int(i)) or "?" for i in ids[~pad].tolist()]

    def _caption(self, ids: Tensor, pad: Tensor) -> str:
        return self.text_encoder.decode(ids, pad)[0]

    def _with_caption(self, tensors: dict[str, Tensor], origin: dict[str, str], pad: dict[str, Tensor],
                      caption: str | None, where: str) -> None:
        """Put a caption (str) into a sample's tensors; nothing without a text input."""
        if self.text is None or caption is None:
            return
        try:
            enc = self.text_encoder([caption])
        except DataError as e:
            raise DemoError(str(e)) from None
        tensors[self.text.key], pad[self.text.key] = enc["ids"][0], enc["pad"][0]
        origin[self.text.key] = where


    # ------------------------------------------------------------------ samples
    def get(self, sample_id: object) -> Sample:
        if not isinstance(sample_id, str):
            raise DemoError(f"'sample' must be a sample id string, got {short(sample_id)}")
        with self._store_lock:
            s = self._store.get(sample_id)
            if s is None:
                raise DemoError(f"unknown sample {short(sample_id)} (expired or never made); load an input again", 404)
            self._store.move_to_end(sample_id)
            return s

    def _keep(self, sample: Sample) -> Sample:
        with self._store_lock:
            self._store[sample.id] = sample
            while len(self._store) > self.limits.max_samples:
                self._store.popitem(last=False)
        return sample

    def _transform(self, keys: Sequence[str]) -> Any:
        from multimae.data.transforms import PairedTransform

        specs = [s for s in self.inputs.values() if s.key in keys]
        return PairedTransform(specs, self.image_size, train=False)

    def _complete(self, tensors: dict[str, Tensor], origin: dict[str, str], title: str,
                  pad: dict[str, Tensor] | None = None) -> Sample:
        """Fill every input modality the sample lacks with the model's prediction from the
        source modality (all its patches visible)."""
        pad = {} if pad is None else pad
        if self.text is not None and self.text.key not in tensors:  # no caption: an empty one (all padding),
            self._with_caption(tensors, origin, pad, "", "none")  # since the M3AE decoder needs its positions
        missing = [s for s in self.inputs.values() if s.key not in tensors]
        if missing:
            batch = {self.source.key: tensors[self.source.key][None].to(self.device)}
            can = [s.name for s in missing if s.name in self.tasks]
            with self._lock, torch.inference_mode(), autocast(self.precision, self.device):
                preds = self.model(batch, MaskPlan.all_visible({self.source.name: self._n_tokens}, 1), tasks=can,
                                   compute_loss=False).preds if can else {}
            for s in missing:
                if s.name not in preds:
                    continue  # neither given nor predictable: left out of the model's input
                p = preds[s.name][0].float().cpu()
                tensors[s.key] = p.argmax(0) if s.kind == "categorical" else p
                origin[s.key] = f"predicted from {self.source.name}"
        return self._keep(Sample(tensors, origin, title, pad))

    def synthetic(self, index: object) -> Sample:
        """Scene ``index`` of the built-in synthetic stream ``scene_seed``, with its exact maps."""
        from multimae.data.synthetic import generate

        if "synthetic" not in self.sources:
            raise DemoError("this model has no rgb input to show synthetic scenes to")
        i = _number(index, "index", 0, MAX_SCENE_INDEX)
        raw = generate(self.scene_seed, i, self.image_size)
        keys = [s.key for s in self.inputs.values() if s.key in SYNTHETIC_KEYS]
        out = self._transform(keys)({k: raw[k] for k in keys} | {"__key__": raw["__key__"]})
        tensors, origin, pad = {k: out[k] for k in keys}, {k: "true" for k in keys}, {}
        self._with_caption(tensors, origin, pad, raw.get("caption"), "true")
        return self._complete(tensors, origin, f"synthetic scene {i}", pad)

    def _open_folder(self, root: str | Path, split: str) -> tuple[Any, list[str]]:
        from multimae.data.folder import FolderDataset

        split_dir = Path(root) / split
        keys = [s.key for s in self.inputs.values() if (split_dir / s.key).is_dir()]
        if self.source.key not in keys:
            raise DataError(f"{split_dir}: no {self.source.key}/ directory (the demo needs the "
                            f"{self.source.name} modality of every sample)")
        return FolderDataset(root, split, keys), keys

    def folder_sample(self, index: object) -> Sample:
        """Sample ``index`` of the folder dataset; its missing modalities are predicted."""
        if self.folder is None:
            raise DemoError("no folder dataset: start the demo with --data ROOT")
        ds, keys = self.folder
        i = _number(index, "index", 0, len(ds) - 1)
        try:
            raw = ds.load(i)
        except DataError as e:
            raise DemoError(str(e), 422) from None
        out = self._transform(keys)(raw)
        return self._complete({k: out[k] for k in keys}, {k: "true" for k in keys}, f"folder sample {ds.key(i)}")

    def upload(self, data: bytes, name: str = "upload") -> Sample:
        """An uploaded image file as the source modality; every other input is predicted."""
        lim = self.limits
        img = decode_upload(data, lim.max_upload_bytes, lim.max_pixels, lim.max_side)
        if self.source.kind != "image" or self.source.channels != 3:
            raise DemoError(f"uploads feed the {self.source.name} input, which is not an rgb image")
        out = self._transform([self.source.key])({self.source.key: img, "__key__": name})
        h, w = img.shape[-2:]
        return self._complete({self.source.key: out[self.source.key]}, {self.source.key: "uploaded"},
                              f"uploaded image ({w}x{h} after the size limit)")

    # ------------------------------------------------------------------ masks
    def random_mask(self, sample_id: object, budget: object, alpha: object, seed: object) -> dict[str, list[int]]:
        """MultiMAE masking of the sample's modalities: ``budget`` visible patches split by a
        Dirichlet(``alpha``) draw. Returns the hidden patch indices per modality."""
        sample = self.get(sample_id)
        names = [n for n, s in self.inputs.items() if s.key in sample.tensors]
        total = len(names) * self._n_tokens
        k = _number(budget, "budget", 0, total)
        a = _number(alpha, "alpha", 0.01, 100.0, integer=False)
        g = torch.Generator().manual_seed(_number(seed, "seed", 0, 2**62))
        plan = dirichlet_plan({n: self._n_tokens for n in names}, 1, k, a, generator=g)
        out = {n: plan.masks[n][0].nonzero().flatten().tolist() for n in names}
        if self.text is not None and self.text.key in sample.tensors:  # M3AE: a ratio of the words hidden
            n_words = int((~sample.pad[self.text.key]).sum())
            hide = round(self.text_ratio * n_words)
            out[self.text.name] = sorted(torch.randperm(n_words, generator=g)[:hide].tolist())
        return out

    def _plan(self, sample: Sample, hidden: object) -> MaskPlan:
        if not isinstance(hidden, Mapping):
            raise DemoError("'hidden' must be an object: modality -> list of hidden patch indices")
        names = [n for n, s in self.inputs.items() if s.key in sample.tensors]
        text = self.text.name if self.text is not None and self.text.key in sample.tensors else None
        unknown = sorted(set(map(str, hidden)) - set(names) - {text})
        if unknown:
            raise DemoError(f"'hidden' names {short(unknown)}, which are not inputs of this sample {names}")
        N = self._n_tokens
        masks = {}
        for n in names:
            m = torch.zeros(1, N, dtype=torch.bool)
            m[0, _indices(hidden.get(n, []), f"hidden.{n}", N)] = True
            masks[n] = m
        if text is not None:  # word positions; padding is never visible
            pad = sample.pad[self.text.key]
            m = pad.clone()[None]
            m[0, _indices(hidden.get(text, []), f"hidden.{text}", max(1, int((~pad).sum())))] = True
            masks[text] = m
        return MaskPlan(masks)

    # ------------------------------------------------------------------ predictions
    def predict(self, sample_id: object, hidden: object) -> dict[str, Any]:
        """Every output task's prediction beside its target, for the given hidden patches."""
        sample = self.get(sample_id)
        plan = self._plan(sample, hidden)
        specs = {**self.inputs, **({self.text.name: self.text} if self.text is not None else {})}
        batch = {specs[n].key: sample.tensors[specs[n].key][None].to(self.device) for n in plan.masks}
        for s in self.tasks.values():  # output-only tasks (norm_rgb) read their target's key
            if s.key in sample.tensors:
                batch.setdefault(s.key, sample.tensors[s.key][None].to(self.device))
        from multimae.core.batch import Batch

        pads = {k: v[None].to(self.device) for k, v in sample.pad.items() if k in batch}
        tasks = list(self.tasks) + (list(self.text_tasks) if pads else [])
        with self._lock:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(self.precision, self.device):
                preds = self.model(Batch(batch, pads), plan.to(self.device), tasks=tasks, compute_loss=False).preds
            self.last_ms = ms = (time.perf_counter() - t0) * 1000
        outputs = {}
        by_key = {self.inputs[n].key: n for n in plan.masks if n in self.inputs}
        for t, s in self.tasks.items():
            target = sample.tensors.get(s.key)
            pred = prediction_image(s, preds[t][0].cpu(), target, self.patch)
            shown = show(s, target) if target is not None else None
            if shown is not None and s.key in by_key and shown.shape == pred.shape:
                # as in MultiMAE's figures: the visible input patches pasted in, the hidden ones predicted
                visible = (~plan.masks[by_key[s.key]][0]).nonzero().flatten().tolist()
                pred = torch.where(patch_mask(visible, self.grid, tuple(pred.shape[-2:])), shown, pred)
            entry: dict[str, Any] = {"pred": png_data_url(pred)}
            entry["target"] = png_data_url(shown) if shown is not None else None
            entry["target_origin"] = sample.origin.get(s.key, "none")
            outputs[t] = entry
        texts = {}
        for t, s in self.text_tasks.items():
            if t not in preds or s.key not in sample.tensors:
                continue
            ids, pad = sample.tensors[s.key], sample.pad[s.key]
            guess = preds[t][0].float().argmax(-1).cpu()
            hid = plan.masks[self.text.name][0].cpu() & ~pad if self.text is not None and s.key == self.text.key \
                else ~pad
            tok = self.text_encoder.tokenizer
            real = (~pad).nonzero().flatten().tolist()
            filled = torch.where(hid, guess, ids)  # visible words as given, hidden ones predicted
            texts[t] = {"tokens": [tok.id_to_token(int(filled[j])) or "?" for j in real],
                        "hidden": [bool(hid[j]) for j in real], "caption": self._caption(filled, pad),
                        "target": self._caption(ids, pad)}
        visible = {n: int((~m).sum()) for n, m in plan.masks.items()}
        return {"sample": sample.id, "outputs": outputs, "texts": texts, "visible": visible,
                "model_ms": round(ms, 2)}

    # ------------------------------------------------------------------ edits
    def edit(self, sample_id: object, modality: object, patches: object, hue: object = None,
             cls: object = None, caption: object = None) -> Sample:
        """A new sample with the hue of some rgb patches rotated (``hue`` degrees), some semseg
        patches set to class ``cls``, or (M3AE) its caption replaced by ``caption``."""
        sample = self.get(sample_id)
        if self.text is not None and modality == self.text.name:
            if not isinstance(caption, str):
                raise DemoError(f"editing {self.text.name} needs 'caption' (a string), got {short(caption)}")
            if len(caption) > 20 * self.text.max_len:
                raise DemoError(f"'caption' has {len(caption)} characters; {self.text.name} holds "
                                f"{self.text.max_len} tokens")
            tensors, origin, pad = dict(sample.tensors), dict(sample.origin), dict(sample.pad)
            self._with_caption(tensors, origin, pad, caption, "edited")
            return self._keep(Sample(tensors, origin, _edited(sample.title), pad))
        spec = self.inputs.get(modality) if isinstance(modality, str) else None
        if spec is None or spec.key not in sample.tensors:
            raise DemoError(f"'modality' must be an input of this sample, one of "
                            f"{[n for n, s in self.inputs.items() if s.key in sample.tensors]}, got {short(modality)}")
        idx = _indices(patches, "patches", self._n_tokens)
        if not idx:
            raise DemoError("'patches' is empty: select the patches to edit first")
        x = sample.tensors[spec.key]
        region = patch_mask(idx, self.grid, tuple(x.shape[-2:]))
        if spec.kind == "image" and spec.channels == 3:
            if hue is None:
                raise DemoError(f"editing {spec.name} needs 'hue' (degrees)")
            degrees = _number(hue, "hue", -360.0, 360.0, integer=False)
            new = shift_hue(spec, x, region, degrees)
        elif spec.kind == "categorical":
            if cls is None:
                raise DemoError(f"editing {spec.name} needs 'class' (a class id)")
            k = _number(cls, "class", 0, spec.num_classes - 1)
            new = set_class(x, region, k)
        else:
            raise DemoError(f"{spec.name} ({spec.kind}) cannot be edited; rgb hue and semseg class can")
        tensors = dict(sample.tensors) | {spec.key: new}
        origin = dict(sample.origin) | {spec.key: f"{sample.origin[spec.key]}, edited"}
        return self._keep(Sample(tensors, origin, _edited(sample.title), dict(sample.pad)))


def _edited(title: str) -> str:
    """The title of an edited sample: its input's title marked once, however many edits."""
    return title if title.endswith(" (edited)") else f"{title} (edited)"


def _number(v: object, name: str, lo: float, hi: float, integer: bool = True) -> Any:
    """A JSON number in [lo, hi] (``integer``: a whole one, as an int; else a float, not NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
            or (integer and isinstance(v, float) and not v.is_integer()):
        raise DemoError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {short(v)}")
    if not lo <= v <= hi:
        raise DemoError(f"'{name}' must be in [{lo}, {hi}], got {int(v) if integer else v}")
    return int(v) if integer else float(v)


def _indices(v: object, name: str, n: int) -> list[int]:
    """Patch indices: a list of distinct-or-not ints in [0, n)."""
    if not isinstance(v, list):
        raise DemoError(f"'{name}' must be a list of patch indices, got {type(v).__name__}")
    if len(v) > 4 * n:
        raise DemoError(f"'{name}' has {len(v)} entries; there are only {n} patches")
    bad = [x for x in v if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n]
    if bad:
        raise DemoError(f"'{name}': patch indices must be integers in [0, {n - 1}], got {short(bad[:5])}")
    return list(v)


def engine_from_checkpoint(path: str | Path, data: str | Path | None = None, split: str | None = None,
                           precision: str = "auto", limits: Limits = Limits()) -> DemoEngine:
    """A DemoEngine for a run or checkpoint directory (the run's image size and masking).

    ``data``: a folder dataset root to offer samples from (default: the run's own, when it
    trained on one); ``split``: its split (default ``val`` when it exists, else the run's).
    """
    from multimae.data.config import DataConfig, MaskConfig
    from multimae.data.loader import held_out_seed
    from multimae.data.sources import get_source
    from multimae.runs import load_run, pretrain_classes

    run = load_run(path)
    if run.kind != "pretrain":
        raise DemoError(f"{run.checkpoint}: a {run.kind} run; the demo shows a pretraining run's predictions")
    model = run.model
    dcfg, mcfg = run.section(DataConfig, "data"), run.section(MaskConfig, "mask")
    seed = int((run.config.get("train") or {}).get("seed", 0))
    source = get_source(dcfg.source)
    root = data if data is not None else (dcfg.root if source.browsable_root else None)
    folder = None if root is None else (root, split or ("val" if (Path(root) / "val").is_dir() else dcfg.split))
    semseg = model.output_specs.get("semseg")
    names = pretrain_classes({"source": dcfg.source, "root": root}, "semseg", semseg.num_classes) if semseg else None
    tokenizer, ratio = None, 0.75  # M3AE's text mask ratio
    texts = [s for s in model.input_specs.values() if s.kind == "text"]
    if texts:
        from multimae.data.loader import load_text_tokenizer

        tokenizer = load_text_tokenizer(dcfg.tokenizer)
        r = mcfg.ratios.get(texts[0].name, ratio)
        ratio = float(sum(r) / 2 if isinstance(r, (tuple, list)) else r)
    return DemoEngine(model, dcfg.image_size, mcfg.num_visible, mcfg.alpha, folder=folder,
                      precision=precision, limits=limits, class_names=names,
                      scene_seed=held_out_seed(seed),  # the run's held-out scenes
                      tokenizer=tokenizer, text_ratio=ratio)
