"""Position tables at another image size or patch grid.

A table is stored as an image, ``(1, D, h, w)``. Fixed sine-cosine tables are regenerated
exactly for the new grid (resampling a sine-cosine table only approximates the table the model
would have been built with); learned tables are resampled bicubically (``F.interpolate``,
``align_corners=False``, the resampling MAE / DeiT / timm use when fine-tuning at a higher
resolution). Two sine-cosine layouts are recognised:

* ``"rows_first"``: sin/cos of the row index in the first half of the channels, of the column
  index in the second (official MultiMAE tables; :func:`multimae.model.layers.pos_embed.sincos_2d`);
* ``"cols_first"``: the halves swapped (facebookresearch/mae ``get_2d_sincos_pos_embed``).
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from multimae.model.layers.pos_embed import sincos_2d

SincosLayout = Literal["rows_first", "cols_first"]


def sincos_table(h: int, w: int, dim: int, layout: SincosLayout = "rows_first") -> Tensor:
    """A 2D sine-cosine table, (1, dim, h, w), in ``layout``."""
    t = sincos_2d(h, w, dim)
    if layout == "cols_first":
        t = torch.cat([t[:, dim // 2:], t[:, : dim // 2]], dim=1)
    return t.contiguous()


def sincos_layout(table: Tensor, atol: float = 1e-4) -> SincosLayout | None:
    """Which sine-cosine layout a (1, D, h, w) table is, or None for a learned table."""
    if table.ndim != 4 or table.shape[0] != 1 or table.shape[1] % 4:
        return None
    _, d, h, w = table.shape
    t = table.detach().float().cpu()
    for layout in ("rows_first", "cols_first"):
        if torch.allclose(t, sincos_table(h, w, d, layout), atol=atol, rtol=0):
            return layout  # type: ignore[return-value]
    return None


def resize_pos_table(table: Tensor, grid: tuple[int, int], mode: str = "bicubic") -> tuple[Tensor, str]:
    """(1, D, h, w) -> (1, D, gh, gw) and how: ``"unchanged"``, ``"regenerated (<layout> sine-cosine)"``
    or ``"resampled (<mode>)"``."""
    gh, gw = grid
    if tuple(table.shape[-2:]) == (gh, gw):
        return table, "unchanged"
    layout = sincos_layout(table)
    if layout is not None:
        return sincos_table(gh, gw, table.shape[1], layout).to(table.dtype), f"regenerated ({layout} sine-cosine)"
    out = F.interpolate(table.float(), size=(gh, gw), mode=mode, align_corners=False)
    return out.to(table.dtype), f"resampled ({mode})"


def fit_pos_tables(sd: Mapping[str, Tensor], own: Mapping[str, Tensor],
                   modes: Mapping[str, str] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Resize every 4D ``*pos_emb`` table of ``sd`` whose grid differs from the model's (``own``).

    Returns the new state_dict and ``{key: "14x14 -> 24x24 regenerated (...)"}`` for the tables
    that changed. ``modes``: key -> interpolation mode for learned tables (default bicubic).
    """
    out = dict(sd)
    notes: dict[str, str] = {}
    for k, v in sd.items():
        target = own.get(k)
        if not k.endswith("pos_emb") or target is None or v.ndim != 4 or target.ndim != 4:
            continue
        if v.shape[:2] != target.shape[:2] or v.shape[-2:] == target.shape[-2:]:
            continue
        new, how = resize_pos_table(v, tuple(target.shape[-2:]), (modes or {}).get(k, "bicubic"))
        out[k] = new
        notes[k] = f"{v.shape[-2]}x{v.shape[-1]} -> {target.shape[-2]}x{target.shape[-1]} {how}"
    return out, notes
