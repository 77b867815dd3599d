"""Transfer samples (fine-tuning and probing): model inputs plus one ``target``, with paired crops.

A raw sample (see :mod:`multimae.data`) becomes ``{<input keys>: ..., "target": ..., "__key__"}``
(+ ``"target_valid"`` (1,S,S) bool for dense targets):

* ``label`` target: int64 (), the image-level class.
* categorical target (segmentation): int64 (S,S) at full resolution, ``ignore_index`` where
  nothing is scored (padding, or the dataset's own ignore label).
* dense target (depth, normals, ...): float32 (C,S,S) in the dataset's units (metres for depth,
  never standardised), 0 where invalid; ``target_valid`` says where. Invalid raw pixels (depth
  <= 0, non-finite values, zero normals) never leak into valid ones through interpolation.

Inputs go through :class:`~multimae.data.transforms.PairedTransform` (their pretraining
normalisation, e.g. robust-standardised depth) and the target through a second one drawn from an
identically seeded generator, so both see the same crop and flip. Evaluation either centre-crops
(classification) or *letterboxes* (dense tasks): the longest side is resized to the image size
and the rest padded (no sliding window), padding being invalid / ``ignore_index`` in the target.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from multimae.data.errors import DataError
from multimae.data.transforms import PairedTransform
from multimae.core.modalities import ModalitySpec, get, registered

LABEL = "label"
TARGET = "target"
TARGET_VALID = "target_valid"


def target_spec(target: str, kind: str, num_classes: int | None = None,
                overrides: dict[str, dict] | None = None) -> ModalitySpec | None:
    """The spec a target is read and resized with (None for an image-level ``label``).

    Segmentation targets are categorical at full resolution (stride 1); dense targets keep their
    units (no standardisation).
    """
    if target == LABEL:
        return None
    over = dict((overrides or {}).get(target, {}))
    if target in registered():
        spec = get(target).with_(**over) if over else get(target)
    elif over:
        spec = ModalitySpec(name=target, **over)
    else:
        raise KeyError(f"data.target={target!r} is not a registered modality; declare it under "
                       f"model.encoder.modalities.{target}")
    if kind == "segmentation":
        if spec.kind != "categorical":
            raise ValueError(f"segmentation target {target!r} must be categorical, it is {spec.kind}")
        return spec.with_(stride=1, num_classes=num_classes or spec.num_classes, input=True)
    if spec.kind not in ("dense", "image"):
        raise ValueError(f"{kind} target {target!r} must be a dense modality, it is {spec.kind}")
    return spec.with_(standardize="none", mean=None, std=None, input=True)


def mark_invalid(x: Tensor) -> Tensor:
    """A dense raw map (C,H,W) with invalid pixels as NaN: non-finite anywhere, all channels 0,
    or (one channel, e.g. depth) <= 0."""
    x = x.float()
    bad = ~torch.isfinite(x).all(0, keepdim=True) | (x == 0).all(0, keepdim=True)
    if x.shape[0] == 1:
        bad |= x <= 0
    return torch.where(bad, torch.full((), float("nan")), x)


def letterbox(x: Tensor, value: float) -> Tensor:
    """Pad (..., H, W) on the bottom / right to a square of side max(H, W) with ``value``."""
    h, w = x.shape[-2:]
    s = max(h, w)
    return x if h == w else F.pad(x, (0, s - w, 0, s - h), value=value)


GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class PhotometricRandAugment(v2.RandAugment):
    """torchvision v2 RandAugment restricted to the operations that move no pixel (for rgb fed
    together with other spatial modalities, which must stay aligned with it)."""

    _AUGMENTATION_SPACE = {k: v for k, v in v2.RandAugment._AUGMENTATION_SPACE.items() if k not in GEOMETRIC_OPS}


def build_randaugment(num_ops: int, magnitude: int, photometric: bool) -> nn.Module:
    """torchvision v2 RandAugment (all operations, or the photometric ones) for uint8 (3,H,W) rgb."""
    cls = PhotometricRandAugment if photometric else v2.RandAugment
    return cls(num_ops=num_ops, magnitude=magnitude)


class TransferTransform:
    """Raw sample -> inputs + target, see the module docstring.

    Args:
        inputs: the model's input specs.
        target: ``"label"`` or the key of a dense / categorical field of the raw sample.
        spec: :func:`target_spec` of ``target`` (None for ``label``).
        image_size: output side S.
        train: random resized crop + flip (+ RandAugment); else centre crop or letterbox.
        letterbox_eval: evaluation resizes the longest side and pads (dense tasks).
        ignore_index: padding label of categorical targets.
        eval_crop_pct: evaluation centre crop keeps this fraction of the shorter side.
        train_crop: "random_resized" or "shorter_side" (random square of the shorter side's size).
        randaugment: a module applied to the raw uint8 rgb before cropping (train only); its
            randomness is seeded from the sample's generator, so it is reproducible.
        allow_missing: a sample may lack input modalities (``data.missing=allow``): left out of
            the output (the collator marks them absent); ``required``: inputs it must still have
            (a dense head's ``main_tasks``), a DataError naming the sample otherwise.
    """

    def __init__(self, inputs: Sequence[ModalitySpec], target: str, spec: ModalitySpec | None, image_size: int,
                 train: bool, scale: tuple[float, float] = (0.35, 1.0), hflip: float = 0.5,
                 letterbox_eval: bool = False, ignore_index: int = 255, randaugment: nn.Module | None = None,
                 eval_crop_pct: float = 1.0, train_crop: str = "random_resized", allow_missing: bool = False,
                 required: Sequence[str] = ()) -> None:
        self.inputs = list(inputs)
        self.target, self.spec = target, spec
        self.train, self.letterbox = train, letterbox_eval and not train
        self.ignore_index = ignore_index
        self.randaugment = randaugment if train else None
        kw: dict[str, Any] = dict(train=train, scale=tuple(scale), hflip=hflip,
                                  eval_crop_pct=1.0 if self.letterbox else eval_crop_pct, train_crop=train_crop)
        self.required = [k for k in required if k in {s.key for s in self.inputs}]
        self.input_tf = PairedTransform(self.inputs, image_size, allow_missing=allow_missing, **kw)
        self.target_tf = PairedTransform([spec], image_size, **kw) if spec is not None else None

    def _pad_value(self, spec: ModalitySpec, is_target: bool) -> float:
        if spec.kind == "categorical":
            return float(self.ignore_index) if is_target else 0.0
        return float("nan") if spec.kind == "dense" else 0.0

    def transform_inputs(self, raw: dict, seed: int = 0) -> dict:
        """The model inputs of a raw sample (letterboxed first when evaluating a dense task):
        ``{input keys..., "__key__"}``. The evaluation forward of ``multimae evaluate`` and
        ``multimae predict`` both go through here."""
        if self.letterbox:
            raw = dict(raw)
            for s in self.inputs:
                if s.is_spatial and s.key in raw:
                    raw[s.key] = letterbox(raw[s.key].float() if s.kind == "dense" else raw[s.key],
                                           self._pad_value(s, False))
        out = self.input_tf(raw, generator=torch.Generator().manual_seed(seed))
        return {k: v for k, v in out.items() if k in {s.key for s in self.inputs} or k == "__key__"}

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        where = f"sample {sample.get('__key__', '?')}"
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        raw = dict(sample)
        if self.randaugment is not None and "rgb" in raw:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed ^ 0x5A5A)
                raw["rgb"] = self.randaugment(raw["rgb"])
        tsample: dict = {"__key__": raw.get("__key__", "?")}
        if self.spec is not None:
            if self.spec.key not in raw:
                raise DataError(f"{where}: no target {self.spec.key!r} (has {sorted(raw)})")
            t = raw[self.spec.key]
            if self.spec.kind == "categorical":
                bad = (t < 0) | ((t >= self.spec.num_classes) & (t != self.ignore_index))
                if bool(bad.any()):
                    raise DataError(f"{where}: {self.spec.key} class id {int(t[bad][0])} is outside "
                                    f"[0, {self.spec.num_classes}) and is not the ignore index {self.ignore_index}")
            tsample[self.spec.key] = mark_invalid(t) if self.spec.kind == "dense" else t
        elif LABEL not in raw:
            raise DataError(f"{where}: no image-level 'label' (has {sorted(raw)})")
        lacking = [k for k in self.required if k not in raw]
        if lacking:
            raise DataError(f"{where}: no {lacking[0]!r}, which the head reads (model.head.main_tasks); "
                            f"has {sorted(raw)}")
        if self.letterbox and self.spec is not None:
            tsample[self.spec.key] = letterbox(tsample[self.spec.key], self._pad_value(self.spec, True))
        out = self.transform_inputs(raw, seed)
        if self.spec is None:
            out[TARGET] = torch.as_tensor(raw[LABEL], dtype=torch.int64).reshape(())
            return out
        assert self.target_tf is not None
        t = self.target_tf(tsample, generator=torch.Generator().manual_seed(seed))[self.spec.key]
        out[TARGET] = t
        if self.spec.kind == "dense":
            out[TARGET_VALID] = (t != 0).any(0, keepdim=True)
        return out
