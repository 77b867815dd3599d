"""DPT head (Ranftl et al., 2021) as the official MultiMAE fine-tuning code builds it, generalised.

Facts of the official design that decide the numbers: four hooked encoder layers; the tokens of
the main task(s) (no global token) reshaped to the patch grid; per hook a 1x1 convolution to
``layer_dims[i]`` followed by a resampling to strides 4 / 8 / 16 / 32 of the image (transposed
convolution 4x4/4, transposed convolution 2x2/2, identity, 3x3 convolution with stride 2);
a bias-free 3x3 convolution of each to ``feature_dim``; four fusion blocks from the deepest level
up (residual conv units with ReLU before each 3x3 convolution, bilinear x2 upsampling with
``align_corners=True``, 1x1 output convolution; no batch norm); then the regression output
(3x3 conv to feature_dim/2, bilinear x2, 3x3 conv to 32, ReLU, 1x1 conv to the output channels).

Generalised by configuration: the official adapter fixes hooks [2, 5, 8, 11] and dims
[96, 192, 384, 768] (ViT-B); here both are arguments, with defaults that scale with depth and
width (:func:`default_hooks`, :func:`default_layer_dims`). Where a grid side is odd the fusion
upsamples to the next level's size instead of exactly x2 (identical when the sizes agree), and an
output whose size differs from the image's (patch size other than 16) is resized bilinearly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def default_hooks(depth: int) -> list[int]:
    """Four 0-based block indices evenly spaced and ending at the last block.

    depth 12 -> [2, 5, 8, 11] (the paper's layers 3, 6, 9, 12); depth 4 -> [0, 1, 2, 3]."""
    if depth < 1:
        raise ValueError(f"default_hooks: depth must be >= 1, got {depth}")
    return [max(0, math.ceil(depth * (k + 1) / 4) - 1) for k in range(4)]


def default_layer_dims(dim: int) -> list[int]:
    """The official [96, 192, 384, 768] for dim 768, i.e. [dim/8, dim/4, dim/2, dim] (at least 8)."""
    return [max(8, dim // 8), max(8, dim // 4), max(8, dim // 2), dim]


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convolutions. (B, F, h, w) -> (B, F, h, w)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT feature fusion: (x [+ res1(skip)]) -> res2 -> bilinear upsampling -> 1x1 conv.

    ``forward(x, skip, size)``: x (B, F, h, w), skip (B, F, h, w) or None, size of the output
    (default (2h, 2w)) -> (B, F, *size). The deepest block takes no skip and so has no ``res1``
    (the official one carries an unused one, which would stall DDP's gradient reduction; its
    weights are dropped on loading).
    """

    def __init__(self, features: int, with_skip: bool = True) -> None:
        super().__init__()
        self.res1 = ResidualConvUnit(features) if with_skip else None
        self.res2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            if self.res1 is None:
                raise ValueError("FusionBlock built without a skip input was given one")
            x = x + self.res1(skip)
        x = self.res2(x)
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _reassemble(in_dim: int, out_dim: int, level: int) -> nn.Sequential:
    """1x1 projection then resampling of the token grid: x4, x2, x1, x1/2 for levels 0..3."""
    layers = [nn.Conv2d(in_dim, out_dim, 1)]
    if level < 2:
        layers.append(nn.ConvTranspose2d(out_dim, out_dim, 4 >> level, stride=4 >> level))
    elif level == 3:
        layers.append(nn.Conv2d(out_dim, out_dim, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class DPTHead(nn.Module):
    """Dense regression from four encoder layers.

    Args:
        in_dim: token width fed to the head (encoder dim x number of main tasks).
        out_channels: predicted channels (depth: 1, surface normals: 3).
        layer_dims: widths of the four reassembled levels (official ViT-B: [96, 192, 384, 768]).
        feature_dim: width of the fusion path (official: 256).
        hooks: 0-based encoder blocks whose outputs feed levels 0..3 (kept here so that the
            model knows which layers to return; the head itself takes the four tensors).

    ``forward(layers, grid, image_size)``: four tensors (B, gh*gw, in_dim) (tokens of the main
    task(s) of the hooked layers, row-major grid order), grid (gh, gw), image_size (H, W)
    -> (B, out_channels, H, W).
    """

    def __init__(self, in_dim: int, out_channels: int, layer_dims: Sequence[int], feature_dim: int,
                 hooks: Sequence[int]) -> None:
        super().__init__()
        if len(layer_dims) != 4 or len(hooks) != 4:
            raise ValueError(f"DPTHead: needs 4 layer_dims and 4 hooks, got {list(layer_dims)} and {list(hooks)}")
        if feature_dim < 2:
            raise ValueError(f"DPTHead: feature_dim must be >= 2, got {feature_dim}")
        self.hooks = [int(h) for h in hooks]
        self.reassemble = nn.ModuleList([_reassemble(in_dim, d, i) for i, d in enumerate(layer_dims)])
        self.project = nn.ModuleList([nn.Conv2d(d, feature_dim, 3, padding=1, bias=False) for d in layer_dims])
        self.fusion = nn.ModuleList([FusionBlock(feature_dim, with_skip=i < 3) for i in range(4)])
        self.output = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, out_channels, 1),
        )

    def forward(self, layers: Sequence[Tensor], grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        if len(layers) != 4:
            raise ValueError(f"DPTHead: expected 4 layers, got {len(layers)}")
        gh, gw = grid
        feats = []
        for i, t in enumerate(layers):
            B, N, C = t.shape
            if N != gh * gw:
                raise ValueError(f"DPTHead: {N} tokens do not fill a {gh}x{gw} grid")
            x = t.transpose(1, 2).reshape(B, C, gh, gw).contiguous()  # (channels-last strides otherwise)
            feats.append(self.project[i](self.reassemble[i](x)))
        x = self.fusion[3](feats[3], size=feats[2].shape[-2:])
        x = self.fusion[2](x, feats[2], size=feats[1].shape[-2:])
        x = self.fusion[1](x, feats[1], size=feats[0].shape[-2:])
        x = self.fusion[0](x, feats[0])
        out = self.output(x)
        if tuple(out.shape[-2:]) != tuple(image_size):
            out = F.interpolate(out, size=tuple(image_size), mode="bilinear", align_corners=False)
        return out
