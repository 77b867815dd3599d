"""The model layer: MultiMAE, its configuration, layers, adapters, decoders, heads and the transfer model.

``from multimae.model import MultiMAE`` keeps working (the names resolve lazily from
:mod:`multimae.model.multimae`, so importing a submodule does not build the whole model layer)."""
from __future__ import annotations


def __getattr__(name: str):
    from multimae.model import multimae as _impl

    try:
        return getattr(_impl, name)
    except AttributeError:
        raise AttributeError(f"module 'multimae.model' has no attribute {name!r}") from None
