"""Input adapters: one per modality, each turning a tensor into (B, N, D) tokens.

Every adapter adds a fixed 2D sine-cosine position embedding built for ``image_size`` and
resampled when the input grid differs (bicubic for images, bilinear for class maps, as the
official code does), so any image size divisible by the patch size works.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from multimae.model.adapters.text import TextInput, check_ids
from multimae.model.layers.pos_embed import resample_pos, sincos_2d
from multimae.model.losses import patchify
from multimae.core.modalities import ModalitySpec


class _GridInput(nn.Module):
    pos_mode = "bicubic"

    def __init__(self, spec: ModalitySpec, dim: int, patch_size: int, image_size: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.spec = spec
        self.patch = spec.patch(patch_size)
        g = image_size // patch_size
        self.register_buffer("pos_emb", sincos_2d(g, g, dim))

    def _check_size(self, h: int, w: int) -> tuple[int, int]:
        if h % self.patch or w % self.patch:
            s = self.spec
            raise ValueError(
                f"{s.name}: size {h}x{w} is not divisible by its patch size {self.patch} "
                f"(image size must be a multiple of patch_size={self.patch * s.stride}"
                + (f"; {s.name} is given at 1/{s.stride} resolution" if s.stride > 1 else "") + ")")
        return h // self.patch, w // self.patch

    def _tokens(self, feat: Tensor, proj: nn.Conv2d) -> Tensor:
        """(B, C, H, W) features -> (B, N, D) tokens with position embeddings.

        The projection keeps the official ``Conv2d`` parameters (checkpoints load unchanged) but
        runs as one matmul over the flattened patches: the same result up to rounding, and on CPUs
        under bf16 autocast far faster than the convolution's backward.
        """
        grid = self._check_size(*feat.shape[-2:])
        w = proj.weight  # (D, C, p, p) -> (D, p*p*C), the order patchify gives. One channel: a plain
        # view, so the gradient keeps the parameter's exact strides (through a permute its size-1
        # channel dim gets stride 1, and DDP copies every such gradient into its bucket each step).
        weight = w.flatten(1) if w.shape[1] == 1 else w.permute(0, 2, 3, 1).flatten(1)
        x = F.linear(patchify(feat, self.patch), weight, proj.bias)
        return x + resample_pos(self.pos_emb, grid, self.pos_mode).to(x.dtype)


class PatchInput(_GridInput):
    """Linear projection of non-overlapping patches. x: (B, C, H, W) float -> (B, N, D)."""

    def __init__(self, spec: ModalitySpec, dim: int, patch_size: int, image_size: int) -> None:
        super().__init__(spec, dim, patch_size, image_size)
        self.proj = nn.Conv2d(spec.channels, dim, self.patch, self.patch)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.spec.channels:
            raise ValueError(f"{self.spec.name}: expected (B, {self.spec.channels}, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{self.spec.name}: expected a float tensor, got {x.dtype}")
        return self._tokens(x, self.proj)


class CategoricalInput(_GridInput):
    """Class map -> learned class embeddings -> patch projection. x: (B, h, w) int64 -> (B, N, D)."""

    pos_mode = "bilinear"

    def __init__(self, spec: ModalitySpec, dim: int, patch_size: int, image_size: int) -> None:
        super().__init__(spec, dim, patch_size, image_size)
        self.class_emb = nn.Embedding(spec.num_classes, spec.class_emb_dim)
        self.proj = nn.Conv2d(spec.class_emb_dim, dim, self.patch, self.patch)

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"{s.name}: expected class ids (B, H/{s.stride}, W/{s.stride}), got shape {tuple(x.shape)}")
        if x.is_floating_point():
            raise TypeError(f"{s.name}: expected integer class ids, got {x.dtype}")
        check_ids(self, x, "class")
        feat = self.class_emb(x.long()).permute(0, 3, 1, 2)
        return self._tokens(feat, self.proj)


def build_input_adapter(spec: ModalitySpec, dim: int, patch_size: int, image_size: int) -> nn.Module:
    """The input adapter a modality's ``kind`` calls for."""
    if spec.kind in ("image", "dense"):
        return PatchInput(spec, dim, patch_size, image_size)
    if spec.kind == "categorical":
        return CategoricalInput(spec, dim, patch_size, image_size)
    if spec.kind == "text":
        return TextInput(spec, dim)
    raise ValueError(f"{spec.name}: no input adapter for kind {spec.kind!r}")
