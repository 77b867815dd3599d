"""The training engine: one Trainer (distributed set-up, seeding, optimizer and schedule, exact
resume, batches, fit, save) that runs a task (:mod:`multimae.tasks`), the optimisation step,
optimizer groups and schedules, run logging and progress."""

from multimae.engine.logging import Progress, RunLogger
from multimae.engine.optim import (
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
