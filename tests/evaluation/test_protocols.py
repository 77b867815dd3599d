"""``multimae.evaluation.protocols``: AUROC by the Mann-Whitney statistic (ties count one half),
the attribute probe with its majority baseline, OOD detection by the MSP of a probe fitted on the
in-distribution classes only."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from multimae.evaluation.protocols import auroc, majority_top1, ood_msp, probe_attribute


def _brute_auroc(pos: list[float], neg: list[float]) -> float:
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auroc_matches_the_pairwise_definition_with_ties() -> None:
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (17,), generator=g).float().tolist()  # many ties
    neg = torch.randint(0, 4, (11,), generator=g).float().tolist()
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg))
    assert math.isnan(auroc([], [1.0])) and math.isnan(auroc([1.0], []))


class _Fixed(nn.Module):
    """A 'probe' whose logits are the first ``k`` feature columns."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.k]


def test_probe_attribute_scores_and_majority_baseline() -> None:
    eval_y = torch.tensor([0, 1, 2, 2])
    eval_x = nn.functional.one_hot(torch.tensor([0, 1, 1, 2]), 3).float()  # 3 of 4 right
    train_y = torch.tensor([2, 2, 1])
    seen = {}

    def fit(x: torch.Tensor, y: torch.Tensor, k: int) -> nn.Module:
        seen.update(n=len(y), k=k)
        return _Fixed(k)

    res = probe_attribute(fit, torch.zeros(3, 3), train_y, eval_x, eval_y, 3)
    assert seen == {"n": 3, "k": 3}
    assert res["metrics"] == {"top1": 75.0}  # no top-5 with 5 classes or fewer
    assert res["baseline"]["top1"] == 50.0 == majority_top1(train_y, eval_y, 3)  # class 2: 2 of 4
    ranked = torch.arange(7.0).flip(0).repeat(4, 1)  # every sample ranks classes 0 > 1 > ... > 6
    res7 = probe_attribute(lambda x, y, k: _Fixed(k), torch.zeros(3, 7), train_y, ranked, eval_y, 7)
    assert res7["metrics"] == {"top1": 25.0, "top5": 100.0}


def test_ood_msp_fits_on_in_distribution_classes_only() -> None:
    g = torch.Generator().manual_seed(0)
    classes, in_ids, out_ids = 4, [0, 2], [3]
    train_y = torch.tensor([0, 1, 2, 3] * 5)
    eval_y = torch.tensor([0, 2, 3, 3, 0, 2, 1])
    fitted = {}

    def fit(x: torch.Tensor, y: torch.Tensor, k: int) -> nn.Module:
        fitted.update(y=y.tolist(), k=k)
        return _Fixed(k)

    # in-distribution samples: one confident logit; OOD samples: flat logits (low MSP)
    eval_x = torch.zeros(len(eval_y), 2)
    for i, c in enumerate(eval_y.tolist()):
        if c in in_ids:
            eval_x[i, in_ids.index(c)] = 5.0 + float(torch.rand((), generator=g))
    res = ood_msp(fit, torch.zeros(len(train_y), 2), train_y, eval_x, eval_y, classes, in_ids, out_ids)
    assert fitted["k"] == 2 and set(fitted["y"]) == {0, 1}  # relabelled 0..1, classes 1 and 3 left out
    assert len(fitted["y"]) == 10
    assert res["metrics"]["auroc"] == 100.0 and res["metrics"]["id_top1"] == 100.0
    assert (res["num_train_in"], res["num_test_in"], res["num_test_ood"]) == (10, 4, 2)  # class 1: neither
    with pytest.raises(ValueError, match="disjoint"):
        ood_msp(fit, torch.zeros(1, 2), train_y[:1], eval_x, eval_y, classes, [0, 3], [3])
