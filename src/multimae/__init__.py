"""multimae: multi-modal, multi-task masked autoencoders (MultiMAE, M3AE) in PyTorch.

The names below resolve lazily (on first use), so ``import multimae`` -- and ``multimae --help``
-- import neither torch nor the model."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "MaskPlan": "multimae.core.masking", "dirichlet_plan": "multimae.core.masking", "ratio_plan": "multimae.core.masking",
    "ModalitySpec": "multimae.core.modalities", "register": "multimae.core.modalities",
    "ModelConfig": "multimae.model.multimae", "MultiMAE": "multimae.model.multimae", "Outputs": "multimae.model.multimae",
    "load_official_multimae": "multimae.model.multimae", "load_pretrained": "multimae.model.multimae",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
