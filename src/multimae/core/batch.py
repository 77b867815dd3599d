"""The typed batch that flows from the loader to the model and the losses.

A :class:`Batch` is a read-only mapping ``batch key -> tensor`` over the modality tensors (so
``batch["rgb"]`` works as for a plain dict), plus what the tensors alone cannot say:

* ``pad[key]``: (B, L) bool, True where a sequence position is padding (text);
* ``present[key]``: (B,) bool, False where a sample lacks the modality (unpaired image-only or
  text-only data; its tensor holds zeros there);
* ``extra``: everything else carried along (``label`` (B,), ``__key__`` list of str, ...), never
  read by the model.

A token that is padding, or belongs to an absent modality, does not exist: it is never encoded,
attended to or scored (:meth:`Batch.absent`). A plain ``dict`` of modality tensors is a batch
with no padding and every modality present (:meth:`Batch.of`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch"]


@dataclass(eq=False)
class Batch(Mapping[str, Tensor]):
    """Modality tensors (B, ...) by batch key, with padding, presence and extra fields."""

    tensors: dict[str, Tensor]
    pad: dict[str, Tensor] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, table in (("pad", self.pad), ("present", self.present)):
            for key, value in table.items():
                if key not in self.tensors:
                    raise KeyError(f"Batch.{name} names {key!r}, which has no tensor (tensors: {sorted(self.tensors)})")
                if value.dtype != torch.bool:
                    table[key] = value.bool()

    # --- mapping over the modality tensors
    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @classmethod
    def of(cls, batch: "Batch | Mapping[str, Any]") -> "Batch":
        """A Batch as is; a plain mapping: its tensors are modalities, everything else ``extra``."""
        if isinstance(batch, Batch):
            return batch
        tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        return cls(tensors, extra={k: v for k, v in batch.items() if k not in tensors})

    @property
    def size(self) -> int:
        """B, the number of samples."""
        return next(iter(self.tensors.values())).shape[0]

    def absent(self, key: str, length: int, device: torch.device | str | None = None) -> Tensor:
        """(B, length) bool: True where a token of ``key`` does not exist (padding, or the whole
        sample lacks the modality). ``length``: the modality's tokens (text: its padded length)."""
        dev = device if device is not None else self.tensors[key].device
        out = torch.zeros(self.size, length, dtype=torch.bool, device=dev)
        if key in self.pad:
            out |= self.pad[key].to(dev)
        if key in self.present:
            out |= ~self.present[key].to(dev)[:, None]
        return out

    def has_absent(self, key: str) -> bool:
        """Whether any token of ``key`` may not exist (the batch carries padding or presence for it)."""
        return key in self.pad or key in self.present

    def _map(self, fn: Callable[[Any], Any]) -> "Batch":
        """A Batch of ``fn`` of every value of every field (tensors, pad, present and extra)."""
        return Batch(*({k: fn(v) for k, v in d.items()} for d in (self.tensors, self.pad, self.present, self.extra)))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self._map(lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in pinned memory. ``DataLoader(pin_memory=True)`` calls this;
        without it the DataLoader rebuilt the batch from its modality tensors alone (a Mapping),
        dropping ``pad``, ``present`` and ``extra``."""
        return self._map(lambda v: v.pin_memory() if isinstance(v, Tensor) else v)

    def select(self, keys: "list[str] | tuple[str, ...]") -> "Batch":
        """Only the modalities ``keys`` (with their padding and presence); extras kept."""
        keep = [k for k in keys if k in self.tensors]
        return Batch({k: self.tensors[k] for k in keep}, {k: v for k, v in self.pad.items() if k in keep},
                     {k: v for k, v in self.present.items() if k in keep}, dict(self.extra))

    def rows(self, index: slice | Tensor) -> "Batch":
        """The samples ``index`` selects (a slice or an index tensor), every field alike."""
        def take(v: Any) -> Any:
            if isinstance(v, Tensor) or (isinstance(v, list) and isinstance(index, slice)):
                return v[index]
            return [v[int(i)] for i in index] if isinstance(v, list) else v

        return self._map(take)
