"""Classification head: pool the encoder's final tokens, LayerNorm, linear."""
from __future__ import annotations

from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """Pooled tokens -> LayerNorm -> Linear, the official MultiMAE classification adapter.

    Args:
        dim: token width D.
        num_classes: K.
        use_global: pool by taking the last token (the last global token, which the encoder
            appends after the modality tokens) instead of the mean of ALL tokens (the default and
            the paper's recipe; the mean includes the global tokens).
        init_scale: the linear layer's initial weights and bias are multiplied by this.

    ``forward(tokens)``: tokens (B, N, D) -> logits (B, K).
    """

    def __init__(self, dim: int, num_classes: int, use_global: bool = False, init_scale: float = 1.0) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"ClassificationHead: num_classes must be positive, got {num_classes}")
        self.use_global = use_global
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        self.fc.weight.data.mul_(init_scale)

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, D): mean of all tokens, or the last (global) token."""
        return tokens[:, -1] if self.use_global else tokens.mean(dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.norm(self.pool(tokens)))
