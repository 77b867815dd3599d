"""Metrics and berHu on hand-made predictions with hand-computed values; accumulation is exact."""
import math

import pytest
import torch

from multimae.evaluation.metrics import (
    confusion_matrix,
    depth_scores,
    depth_scores_from_stats,
    depth_stats,
    merge_stats,
    normal_scores,
    segmentation_scores,
    topk_accuracy,
    topk_scores,
    topk_stats,
)
from multimae.model.losses import berhu_loss

LOGITS = torch.tensor([[0.1, 0.5, 0.3, 0.2],    # target 1: top-1 hit
                       [0.6, 0.1, 0.2, 0.05],   # target 2: second best -> top-2 hit
                       [0.1, 0.2, 0.3, 0.4]])   # target 0: worst -> only top-4
TARGET = torch.tensor([1, 2, 0])


def test_topk_by_hand_and_exact_accumulation():
    acc = topk_accuracy(LOGITS, TARGET, ks=(1, 2, 4))
    assert acc == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top4": 100.0})
    # two batches of unequal size: the accumulated score is the split's, not a mean of batch means (50 %)
    total = merge_stats(None, topk_stats(LOGITS[:1], TARGET[:1], ks=(1,)))
    total = merge_stats(total, topk_stats(LOGITS[1:], TARGET[1:], ks=(1,)))
    assert topk_scores(total)["top1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="k must be in 1..4"):
        topk_stats(LOGITS, TARGET, ks=(5,))


def test_confusion_matrix_miou_by_hand():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])  # the last pixel is ignored
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = segmentation_scores(conf)
    # IoU: class 0 1/(2+1-1), class 1 2/(2+3-2), class 2 1/1; class 3 absent everywhere -> no IoU
    assert s["per_class_iou"][:3] == pytest.approx([50.0, 200 / 3, 100.0])
    assert math.isnan(s["per_class_iou"][3])
    assert s["miou"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert s["pixel_acc"] == pytest.approx(80.0)
    # logits give the same matrix as their argmax; matrices add over batches
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    assert torch.equal(confusion_matrix(logits, target, 4), conf)
    assert torch.equal(confusion_matrix(pred[:, :1], target[:, :1], 4) + confusion_matrix(pred[:, 1:], target[:, 1:], 4),
                       conf)


def test_confusion_matrix_rejects_unknown_classes():
    with pytest.raises(ValueError, match="target class 7 outside"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 1]]]), 3)


def test_depth_metrics_by_hand():
    pred = torch.tensor([[[[1.0, 1.3, 5.0], [3.6, 1.0, 7.0]]]])
    gt = torch.tensor([[[[1.0, 1.0, 0.0], [2.0, 3.0, 7.0]]]])      # gt 0 never counts
    valid = torch.tensor([[[[True, True, True], [True, False, True]]]])  # (1, 3) excluded
    # counted: ratios 1, 1.3, 1.8, 1 -> delta1 2/4, delta2 (< 1.5625) 3/4, delta3 (< 1.953) 4/4
    s = depth_scores(pred, gt, valid)
    assert s["delta1"] == pytest.approx(50.0)
    assert s["delta2"] == pytest.approx(75.0)
    assert s["delta3"] == pytest.approx(100.0)
    assert s["absrel"] == pytest.approx((0 + 0.3 + 0.8 + 0) / 4)
    assert s["rmse"] == pytest.approx(math.sqrt((0.09 + 2.56) / 4))
    # accumulation over a split of the columns equals the whole
    total = merge_stats(None, depth_stats(pred[..., :1], gt[..., :1], valid[..., :1]))
    total = merge_stats(total, depth_stats(pred[..., 1:], gt[..., 1:], valid[..., 1:]))
    assert depth_scores_from_stats(total) == pytest.approx(s)


def test_normal_metrics_by_hand():
    d10 = math.radians(10)
    pred = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 2 * math.sin(d10), 2 * math.cos(d10)], [1, 1, 1]]).T
    gt = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]).T.float()
    pred, gt = pred.reshape(1, 3, 2, 2), gt.reshape(1, 3, 2, 2)
    valid = torch.tensor([True, True, True, False]).reshape(1, 1, 2, 2)
    s = normal_scores(pred, gt, valid)
    assert s["angular_mean"] == pytest.approx((0 + 90 + 10) / 3)
    assert s["within_11_25"] == pytest.approx(200 / 3)
    l1_c = (2 * math.sin(d10) + abs(2 * math.cos(d10) - 1)) / 3
    assert s["l1"] == pytest.approx((0 + 2 / 3 + l1_c) / 3)


def test_berhu_official_definition_by_hand():
    pred = torch.tensor([0.5, 1.0, 3.0, 10.0]).reshape(1, 1, 2, 2).requires_grad_()
    target = torch.zeros(1, 1, 2, 2)
    valid = torch.tensor([True, True, True, False]).reshape(1, 1, 2, 2)
    loss = berhu_loss(pred, target, valid)
    # invalid pixel zeroed; c = 0.2 * max|d| = 0.6; 0.5 < c -> 0.5; 1 -> (1 + .36) / 1.2; 3 -> (9 + .36) / 1.2
    assert float(loss.detach()) == pytest.approx((0.5 + 1.36 / 1.2 + 9.36 / 1.2) / 3)
    loss.backward()
    # c carries no gradient: d/dd (d^2 + c^2) / 2c = d / c
    assert pred.grad.flatten().tolist() == pytest.approx([1 / 3, (1 / 0.6) / 3, (3 / 0.6) / 3, 0.0])
    # c never falls below 1e-5; no valid pixel -> 0
    assert float(berhu_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))) == 0.0
    assert float(berhu_loss(pred, target, torch.zeros_like(valid)).detach()) == 0.0
