"""Losses on masked tokens only.

Every loss is first computed per token -- the mean over the token's pixels (and channels) --
then averaged over the masked tokens of each sample, then over the samples that have any
masked token: the official MultiMAE reduction (per-sample mean, then batch mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.core.modalities import ModalitySpec


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x: Tensor, patch: int, grid: tuple[int, int], channels: int) -> Tensor:
    """(B, rows*cols, p*p*C) -> (B, C, rows*p, cols*p)."""
    B = x.shape[0]
    rows, cols = grid
    x = x.reshape(B, rows, cols, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, rows * patch, cols * patch)


def norm_pix(target: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    """Standardise every patch of (B, C, H, W) over its pixels and channels (MAE's norm-pix)."""
    t = patchify(target, patch)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + eps)
    B, C, H, W = target.shape
    return unpatchify(t, patch, (H // patch, W // patch), C)


def token_loss(pred: Tensor, target: Tensor, spec: ModalitySpec, patch: int) -> Tensor:
    """Per-token loss (B, N) of one task.

    pred: (B, C, H, W) values or (B, K, h, w) logits (categorical), (B, L, V) logits (text);
    target: (B, C, H, W) float, (B, h, w) int64 class ids, or (B, L) int64 token ids.
    """
    if spec.kind == "text":
        return F.cross_entropy(pred.float().transpose(1, 2), target.long(), reduction="none")
    if spec.kind == "categorical":
        if target.ndim == 4:
            target = target[:, 0]
        ce = F.cross_entropy(pred.float(), target.long(), reduction="none")  # (B, h, w)
        return patchify(ce[:, None], patch).mean(-1)
    target = target.to(pred.dtype)
    if spec.norm_pix:
        target = norm_pix(target, patch)
    loss = {"mse": F.mse_loss, "l1": F.l1_loss}.get(spec.loss)
    if loss is None:
        raise ValueError(f"{spec.name}: loss {spec.loss!r} does not apply to kind {spec.kind!r}")
    return patchify(loss(pred, target, reduction="none").float(), patch).mean(-1)


def masked_mean(per_token: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over selected tokens per sample, then over samples that have any. per_token: (B, N);
    weight: (B, N) bool (True = counts) or None (all tokens). Zero (with a graph) if none counts."""
    if weight is None:
        return per_token.mean()
    w = weight.to(per_token.dtype)
    count = w.sum(1)
    has = count > 0  # no host read: samples without a counted token add 0 to the sum and the count
    per_sample = (per_token * w).sum(1) / count.clamp_min(1)
    return torch.where(has, per_sample, 0.0).sum() / has.sum().clamp_min(1)


def covered_samples(per_token: Tensor, weight: Tensor | None) -> Tensor:
    """The samples :func:`masked_mean` averages over (those with a counted token): int64 0-dim
    on the loss's device, no host read. per_token: (B, N); weight: (B, N) bool or None (all)."""
    if weight is None:
        return torch.full((), per_token.shape[0], dtype=torch.int64, device=per_token.device)
    return weight.any(1).sum()


def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, threshold: float = 0.2) -> Tensor:
    """Reverse Huber (berHu) loss on valid pixels, as the official MultiMAE depth fine-tuning defines it.

    ``d = pred - target`` with invalid pixels set to 0; ``c = max(threshold * max|d|, 1e-5)`` over
    the whole batch, taken without gradient; per pixel ``|d|`` where ``|d| < c``, else
    ``(d^2 + c^2) / (2c)``; summed and divided by the number of valid pixels.

    pred, target: (B, C, H, W); valid: bool, broadcastable to pred ((B, 1, H, W)), True = the
    pixel counts; None = every pixel. Returns a scalar (0 with a graph when no pixel is valid).
    """
    if pred.shape != target.shape:
        raise ValueError(f"berhu_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = pred - target.to(pred.dtype)
    if valid is None:
        n: int | Tensor = diff.numel()
    else:
        v = valid.to(torch.bool).expand_as(diff)
        diff = torch.where(v, diff, torch.zeros_like(diff))
        n = v.sum().clamp_min(1)  # no valid pixel: every diff is 0, so the loss is 0 (with a graph)
    ad = diff.abs()
    # c stays on the device (no host read), in float64 like the Python float it replaces
    c = (ad.detach().max().double() * threshold).clamp_min(1e-5)
    per_px = torch.where(ad < c, ad, (diff * diff + c * c) / (2 * c))
    return per_px.sum() / n
