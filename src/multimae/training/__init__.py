"""Training infrastructure: optimizer groups and schedules, run logging and progress."""

from multimae.training.logging import Progress, RunLogger
from multimae.training.optim import (
    WarmupCosine,
    build_optimizer,
    cosine_schedule,
    param_groups,
    scaled_lr,
    vit_layer_id,
)

__all__ = [
    "Progress",
    "RunLogger",
    "WarmupCosine",
    "build_optimizer",
    "cosine_schedule",
    "param_groups",
    "scaled_lr",
    "vit_layer_id",
]
