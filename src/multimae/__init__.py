"""multimae: multi-modal, multi-task masked autoencoders (MultiMAE, M3AE) in PyTorch.

The names below resolve lazily (on first use), so ``import multimae`` -- and ``multimae --help``
-- import neither torch nor the model."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {name: module for module, names in (
    ("multimae.core.masking", "MaskPlan dirichlet_plan ratio_plan"), ("multimae.core.modalities", "ModalitySpec register"),
    ("multimae.model.multimae", "ModelConfig MultiMAE Outputs"),
) for name in names.split()}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
