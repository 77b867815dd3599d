"""The linear-probe head (MAE / M3AE protocol): BatchNorm without affine parameters + linear."""
from __future__ import annotations

from torch import Tensor, nn


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear: (B, D) features -> (B, K) logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fc(self.bn(feats))
