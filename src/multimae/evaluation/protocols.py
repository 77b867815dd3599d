"""Evaluation protocols on frozen features: a linear probe of a class attribute with its
majority-class baseline, out-of-distribution detection by the maximum softmax probability (MSP)
of a probe trained on the in-distribution classes only, AUROC by the Mann-Whitney statistic, and
the caption-word scores of an image-to-caption model (``benchmarks/reproduce.py``'s protocols).

Functions of tensors (and of a model, for the captions). Fitting the probe is the caller's (``fit(x, y, num_classes) ->
module``, e.g. :func:`multimae.tasks.probe.train_probe` with the run's probe settings), so this
module depends on nothing above it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["auroc", "majority_top1", "probe_attribute", "top1_top5", "ood_msp", "caption_word_scores"]

Fit = Callable[[Tensor, Tensor, int], nn.Module]


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve of scores where ``pos`` should score higher than ``neg``: the
    probability that a random positive outscores a random negative, ties counting one half
    (Mann-Whitney U / (n_pos * n_neg)); NaN when either set is empty."""
    if not len(pos) or not len(neg):
        return float("nan")
    values = torch.tensor([*map(float, pos), *map(float, neg)], dtype=torch.float64)
    _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ranks = counts.cumsum(0) - (counts - 1) / 2  # the average 1-based rank of each distinct value (ties)
    n_pos, n_neg = len(pos), len(neg)
    return (float(ranks[group[:n_pos]].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def majority_top1(train_y: Tensor, eval_y: Tensor, num_classes: int) -> float:
    """Top-1 (%) on ``eval_y`` of always answering the most frequent class of ``train_y``."""
    major = int(train_y.bincount(minlength=num_classes).argmax())
    return 100.0 * float((eval_y == major).float().mean())


def probe_attribute(fit: Fit, train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor,
                    num_classes: int) -> dict[str, Any]:
    """Fit a probe on (``train_x``, ``train_y``) and score it on the evaluation split:
    ``{"metrics": {"top1": %, "top5": % (more than 5 classes)}, "baseline": {"top1": majority-class %}}``."""
    metrics = top1_top5(fit(train_x, train_y, num_classes), eval_x, eval_y, num_classes)
    return {"metrics": metrics, "baseline": {"top1": majority_top1(train_y, eval_y, num_classes)}}


@torch.no_grad()
def top1_top5(probe: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> dict[str, float]:
    """top-1 (and top-5 with more than 5 classes) in % of ``probe`` (put in eval mode) on features ``x``."""
    logits = probe.eval()(x)
    out = {"top1": 100.0 * float((logits.argmax(1) == y).float().mean())}
    if num_classes > 5:
        out["top5"] = 100.0 * float((logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean())
    return out


def ood_msp(fit: Fit, train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor, num_classes: int,
            in_ids: Sequence[int], out_ids: Sequence[int]) -> dict[str, Any]:
    """OOD detection by MSP. A probe is fitted on the training samples whose class is one of
    ``in_ids`` (relabelled 0..len-1); on the evaluation split the in-distribution samples are the
    positives, those of ``out_ids`` the negatives, scored by the probe's maximum softmax
    probability. Returns ``{"metrics": {"auroc": %, "id_top1": %}, "num_train_in", "num_test_in",
    "num_test_ood"}``; a class in both sets is an error."""
    if set(in_ids) & set(out_ids) or not in_ids or not out_ids:
        raise ValueError(f"ood_msp: in-distribution {list(in_ids)} and OOD {list(out_ids)} classes must be "
                         "non-empty and disjoint")
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(list(in_ids))] = torch.arange(len(in_ids))
    train_in = remap[train_y] >= 0
    probe = fit(train_x[train_in], remap[train_y[train_in]], len(in_ids))
    with torch.no_grad():
        logits = probe.eval()(eval_x)
    msp, pred = logits.softmax(1).max(1).values, logits.argmax(1)
    test_in = remap[eval_y] >= 0
    test_out = torch.isin(eval_y, torch.tensor(list(out_ids)))
    id_top1 = 100.0 * float((pred[test_in] == remap[eval_y[test_in]]).float().mean()) if test_in.any() else float("nan")
    return {"metrics": {"auroc": 100.0 * auroc(msp[test_in].tolist(), msp[test_out].tolist()), "id_top1": id_top1},
            "num_train_in": int(train_in.sum()), "num_test_in": int(test_in.sum()), "num_test_ood": int(test_out.sum())}


def caption_word_scores(model: nn.Module, batches: Any, key: str, classes: dict[str, list[int]], train_ids: Tensor,
                        train_pad: Tensor) -> dict[str, Any]:
    """Caption prediction from the image alone, per word class (e.g. colour, object type):
    accuracy (%) at the caption positions whose true token is a word of the class and
    position-free recall (%) of those words (:mod:`multimae.evaluation.text_eval`), with their
    frequency baselines (from the training captions ``train_ids`` / ``train_pad``). Returns
    ``{"metrics": {"<class>_acc", "<class>_recall"}, "baseline": {...}, "accuracy": ..., "recall": ...}``."""
    from multimae.evaluation.text_eval import caption_word_accuracy, caption_word_recall

    acc = caption_word_accuracy(model, batches, key, classes, train_ids, train_pad)
    rec = caption_word_recall(model, batches, key, classes, train_ids, train_pad)
    metrics = {f"{c}_acc": 100.0 * r["model"] for c, r in acc.items()}
    metrics.update({f"{c}_recall": 100.0 * r["model"] for c, r in rec.items()})
    base = {f"{c}_acc": 100.0 * max(r["class_frequency_baseline"], r["position_frequency_baseline"])
            for c, r in acc.items()}
    base.update({f"{c}_recall": 100.0 * r["frequency_baseline"] for c, r in rec.items()})
    return {"metrics": metrics, "baseline": base, "accuracy": acc, "recall": rec}
