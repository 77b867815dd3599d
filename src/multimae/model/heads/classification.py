"""Classification head: pool the encoder's final tokens, LayerNorm, linear."""
from __future__ import annotations

from torch import Tensor, nn


def mean_existing(tokens: Tensor, pad: Tensor | None) -> Tensor:
    """(B, N, D) -> (B, D): the mean over the tokens that exist (``pad`` (B, N) True = not)."""
    if pad is None:
        return tokens.mean(dim=1)
    keep = (~pad).to(tokens.dtype)[..., None]
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1)


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

    def pool(self, tokens: Tensor, pad: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, D): mean of all tokens, or the last (global) token. ``pad``: (B, N)
        True = a token that does not exist (a sample lacking an input modality), left out of the mean."""
        return tokens[:, -1] if self.use_global else mean_existing(tokens, pad)

    def forward(self, tokens: Tensor, pad: Tensor | None = None) -> Tensor:
        return self.fc(self.norm(self.pool(tokens, pad)))
