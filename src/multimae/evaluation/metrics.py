"""Downstream metrics as small pure functions, accumulable over batches and ranks.

Why not torchmetrics: it would be one more dependency for a dozen lines of arithmetic per
metric, its stateful ``Metric`` objects carry their own device/DDP synchronisation that would sit
beside the engine's, and some definitions here are the papers' own (depth on valid pixels only,
delta thresholds 1.25^k, angular error of normals) which torchmetrics does not all provide.
Small functions over plain tensors are read and checked against hand-computed values in a few
lines (tests/model/transfer/test_metrics.py).

Every family has two steps so that a whole split is scored exactly (not as a mean of batch
means):

* a *stats* function: one batch -> a dict of float64 sums and a ``count`` (or, for
  segmentation, an int64 confusion matrix); add them over batches with :func:`merge_stats`
  (or ``torch.distributed.all_reduce`` each tensor);
* a *scores* function: stats -> final numbers (Python floats).

Units: top-k, delta_k, mIoU / IoU, pixel accuracy and "within 11.25 degrees" in percent; AbsRel a
fraction; RMSE and L1 in the target's unit; angular error in degrees.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "merge_stats",
    "topk_stats",
    "topk_scores",
    "topk_accuracy",
    "confusion_matrix",
    "segmentation_scores",
    "depth_stats",
    "depth_scores",
    "depth_scores_from_stats",
    "normal_stats",
    "normal_scores",
    "normal_scores_from_stats",
]

Stats = dict[str, Tensor]


def merge_stats(total: Mapping[str, Tensor] | None, stats: Mapping[str, Tensor]) -> Stats:
    """Sum two stats dicts key by key (``total=None`` starts a new one)."""
    if total is None:
        return {k: v.detach().clone() for k, v in stats.items()}
    if set(total) != set(stats):
        raise ValueError(f"merge_stats: keys differ ({sorted(total)} vs {sorted(stats)})")
    return {k: total[k] + stats[k].to(total[k].device) for k in total}


def _f64(x: Tensor | float | int) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu()


def _valid_mask(valid: Tensor | None, like: Tensor) -> Tensor:
    """(B, 1, H, W) or (B, H, W) bool -> (B, H, W); None -> all True."""
    B, _, H, W = like.shape
    if valid is None:
        return torch.ones(B, H, W, dtype=torch.bool, device=like.device)
    v = valid.to(torch.bool)
    if v.ndim == 4:
        if v.shape[1] != 1:
            raise ValueError(f"valid mask must have one channel, got shape {tuple(valid.shape)}")
        v = v[:, 0]
    if tuple(v.shape) != (B, H, W):
        raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match prediction {tuple(like.shape)}")
    return v


# ------------------------------------------------------------------------------- classification

def topk_stats(logits: Tensor, target: Tensor, ks: Iterable[int] = (1,)) -> Stats:
    """Correct counts: logits (B, K), target (B,) class ids -> {"top<k>": #correct, "count": B}."""
    ks = sorted(set(int(k) for k in ks))
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"topk_stats: logits (B, K) and target (B,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    K = logits.shape[1]
    if ks and (ks[0] < 1 or ks[-1] > K):
        raise ValueError(f"topk_stats: k must be in 1..{K} (number of classes), got {ks}")
    out: Stats = {"count": _f64(target.shape[0])}
    if not ks:
        return out
    top = logits.topk(ks[-1], dim=1).indices  # (B, kmax), best first
    hit = top == target[:, None].to(top.device)
    for k in ks:
        out[f"top{k}"] = _f64(hit[:, :k].any(1).sum())
    return out


def topk_scores(stats: Mapping[str, Tensor]) -> dict[str, float]:
    """{"top<k>": % correct} from :func:`topk_stats` sums."""
    n = float(stats["count"])
    return {k: (100.0 * float(v) / n if n else float("nan")) for k, v in stats.items() if k != "count"}


def topk_accuracy(logits: Tensor, target: Tensor, ks: Iterable[int] = (1,)) -> dict[str, float]:
    """Top-k accuracy in % of one batch: logits (B, K), target (B,)."""
    return topk_scores(topk_stats(logits, target, ks))


# --------------------------------------------------------------------------------- segmentation

def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class; add over batches.

    pred: (B, K, H, W) logits (argmax taken) or (B, H, W) class ids; target: (B, H, W) class ids.
    Pixels whose target is ``ignore_index`` are not counted; any other target outside
    [0, K) is an error (never silently dropped).
    """
    if pred.ndim == 4:
        pred = pred.argmax(1)
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    t = target.long().flatten()
    p = pred.long().flatten().to(t.device)
    keep = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    t, p = t[keep], p[keep]
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise ValueError(f"confusion_matrix: target class {int(bad[0])} outside [0, {num_classes}) "
                         f"and not the ignore index {ignore_index}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: predicted class outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_scores(conf: Tensor) -> dict[str, float | list[float]]:
    """mIoU, per-class IoU and pixel accuracy (all %) from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class absent from both targets and predictions has no IoU
    (NaN in ``per_class_iou``) and is left out of the mean.
    """
    conf = conf.to(torch.float64)
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    total = float(conf.sum())
    return {
        "miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "per_class_iou": [100.0 * float(x) for x in iou],
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else float("nan"),
    }


# ---------------------------------------------------------------------------------------- depth

def depth_stats(pred: Tensor, target: Tensor, valid: Tensor | None = None, eps: float = 1e-6) -> Stats:
    """Sums over the valid pixels of one batch: pred, target (B, 1, H, W) depth (positive units),
    valid (B, 1, H, W) bool or None. Pixels with target <= 0 never count; predictions are
    clamped to ``eps`` for the ratios.

    Returns {"delta1", "delta2", "delta3": #pixels with max(pred/gt, gt/pred) < 1.25^k,
    "absrel": sum |pred - gt| / gt, "sq_err": sum (pred - gt)^2, "count": #pixels}.
    """
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"depth_stats: pred and target must be (B, 1, H, W), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    v = _valid_mask(valid, pred) & (target[:, 0] > 0)
    p = pred[:, 0][v].double()
    t = target[:, 0][v].double()
    ratio = torch.maximum(p.clamp_min(eps) / t, t / p.clamp_min(eps))
    out = {f"delta{k}": _f64((ratio < 1.25 ** k).sum()) for k in (1, 2, 3)}
    out["absrel"] = _f64(((p - t).abs() / t).sum())
    out["sq_err"] = _f64(((p - t) ** 2).sum())
    out["count"] = _f64(t.numel())
    return out


def depth_scores_from_stats(stats: Mapping[str, Tensor]) -> dict[str, float]:
    """{"delta1", "delta2", "delta3" (%), "absrel", "rmse"} from :func:`depth_stats` sums."""
    n = float(stats["count"])
    if not n:
        return {k: float("nan") for k in ("delta1", "delta2", "delta3", "absrel", "rmse")}
    out = {f"delta{k}": 100.0 * float(stats[f"delta{k}"]) / n for k in (1, 2, 3)}
    out["absrel"] = float(stats["absrel"]) / n
    out["rmse"] = math.sqrt(float(stats["sq_err"]) / n)
    return out


def depth_scores(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Depth metrics of one batch (see :func:`depth_stats`)."""
    return depth_scores_from_stats(depth_stats(pred, target, valid))


# -------------------------------------------------------------------------------------- normals

def normal_stats(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Stats:
    """Sums over the valid pixels of one batch: pred, target (B, 3, H, W) normal vectors (need not
    be unit length; the angle uses normalised copies), valid (B, 1, H, W) bool or None.

    Returns {"l1": sum over pixels of the mean |pred - gt| over the 3 channels, "angular": sum of
    angles in degrees, "within_11_25": #pixels with angle < 11.25 degrees, "count": #pixels}.
    """
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"normal_stats: pred and target must be (B, 3, H, W), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    v = _valid_mask(valid, pred)
    p = pred.permute(0, 2, 3, 1)[v].double()  # (n, 3)
    t = target.permute(0, 2, 3, 1)[v].double()
    cos = torch.nn.functional.cosine_similarity(p, t, dim=1, eps=1e-12).clamp(-1.0, 1.0)
    ang = torch.rad2deg(torch.acos(cos))
    return {"l1": _f64((p - t).abs().mean(1).sum()), "angular": _f64(ang.sum()),
            "within_11_25": _f64((ang < 11.25).sum()), "count": _f64(p.shape[0])}


def normal_scores_from_stats(stats: Mapping[str, Tensor]) -> dict[str, float]:
    """{"l1", "angular_mean" (degrees), "within_11_25" (%)} from :func:`normal_stats` sums."""
    n = float(stats["count"])
    if not n:
        return {"l1": float("nan"), "angular_mean": float("nan"), "within_11_25": float("nan")}
    return {"l1": float(stats["l1"]) / n, "angular_mean": float(stats["angular"]) / n,
            "within_11_25": 100.0 * float(stats["within_11_25"]) / n}


def normal_scores(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Surface-normal metrics of one batch (see :func:`normal_stats`)."""
    return normal_scores_from_stats(normal_stats(pred, target, valid))
