"""Masking as pure, seeded functions.

A :class:`MaskPlan` says, per input modality, which tokens the encoder does NOT see
(``True`` = masked). Every sampler takes a :class:`torch.Generator`; nothing here touches a
global RNG, so a plan is reproducible from a seed and can be drawn in the data pipeline.

MultiMAE (paper Sec. 3.3): a fixed budget of visible tokens is split across the modalities
present by a per-sample symmetric Dirichlet(alpha) draw, then each modality's share is drawn
uniformly without replacement from its tokens. M3AE: a mask ratio per modality instead.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor


@dataclass
class MaskPlan:
    """Per-modality token masks. ``masks[name]``: bool (B, N_name), True = hidden from the encoder.

    Padding tokens (text) must be masked too; they are told apart from masked content by the
    batch's padding mask, never by the plan.

    ``num_visible`` / ``uneven`` let the model pick the encoder's token slots without reading the
    masks (no host sync in a training step): the samplers set them on the CPU where they draw the
    plan; :meth:`counted` reads them off hand-made masks.
    """

    masks: dict[str, Tensor]
    #: Encoder slots: no sample has more visible tokens than this (the run's static budget, known
    #: where the plan is drawn). None: unknown, the model then reads it off the masks (a host read).
    num_visible: int | None = None
    #: Whether some sample may have fewer than ``num_visible`` visible tokens (its slots padded).
    #: False only when every sample has exactly ``num_visible``: the encoder then needs no padding mask.
    uneven: bool = True

    def __post_init__(self) -> None:
        sizes = {m.shape[0] for m in self.masks.values()}
        if len(sizes) > 1:
            raise ValueError(f"MaskPlan: modalities have different batch sizes {sizes}")
        for name, m in self.masks.items():
            if m.ndim != 2:
                raise ValueError(f"MaskPlan: mask of {name!r} must be (B, N), got shape {tuple(m.shape)}")
            if m.dtype != torch.bool:
                self.masks[name] = m.bool()

    @classmethod
    def from_masks(cls, masks: Mapping[str, Tensor]) -> "MaskPlan":
        """User-given masks (any integer/bool dtype, 1/True = masked), with the visible-token budget
        counted now (one host read of the masks, none in the model's forward)."""
        return cls({k: torch.as_tensor(v).bool() for k, v in masks.items()}).counted()

    @classmethod
    def all_visible(cls, token_counts: Mapping[str, int], batch_size: int, device: torch.device | str = "cpu") -> "MaskPlan":
        """Nothing masked: every token of every modality is visible."""
        return cls({k: torch.zeros(batch_size, n, dtype=torch.bool, device=device) for k, n in token_counts.items()},
                   num_visible=sum(token_counts.values()), uneven=False)

    def counted(self) -> "MaskPlan":
        """This plan with ``num_visible`` / ``uneven`` read off its masks (a host read: do it where
        the plan is made, on the CPU, not in a training step)."""
        total = sum((~m).sum(1) for m in self.masks.values())
        nv = int(total.max()) if self.masks and total.numel() else 0
        return MaskPlan(self.masks, nv, bool((total < nv).any()) if self.masks else False)

    def to(self, device: torch.device | str) -> "MaskPlan":
        return MaskPlan({k: v.to(device, non_blocking=True) for k, v in self.masks.items()}, self.num_visible,
                        self.uneven)

    def subset(self, names: Sequence[str]) -> "MaskPlan":
        """The masks of ``names`` only (the budget is then unknown: counted again by the model)."""
        return MaskPlan({k: self.masks[k] for k in names})


def sample_gamma(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) samples, elementwise, drawn from ``generator`` (Marsaglia-Tsang).

    alpha: (...) positive float -> (...) float. alpha < 1 uses the boost Gamma(a+1) * U^(1/a).
    """
    alpha = alpha.to(torch.float64)
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.zeros_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    for _ in range(64):  # acceptance is > 95% per round; 64 rounds never run out in practice
        x = torch.randn(a.shape, generator=generator, dtype=torch.float64, device=a.device)
        u = torch.rand(a.shape, generator=generator, dtype=torch.float64, device=a.device)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = todo & ok
        out = torch.where(take, d * v, out)
        todo = todo & ~ok
        if not todo.any():
            break
    u = torch.rand(a.shape, generator=generator, dtype=torch.float64, device=a.device)
    out = torch.where(boost, out * u.clamp_min(1e-300) ** (1.0 / alpha.clamp_min(1e-12)), out)
    return out


def sample_dirichlet(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """Dirichlet draws along the last axis. alpha: (B, M) >= 0; a zero alpha gets weight 0."""
    g = torch.where(alpha > 0, sample_gamma(alpha.clamp_min(1e-6), generator), torch.zeros((), dtype=torch.float64))
    total = g.sum(-1, keepdim=True)
    return (g / total.clamp_min(1e-300)).float()


def _round_to_budget(shares: Tensor, budget: Tensor, capacity: Tensor) -> Tensor:
    """Integer counts (B, M) summing exactly to min(budget, capacity.sum()) per row.

    Largest-remainder rounding of ``shares * budget``, then tokens beyond a modality's
    capacity are moved to the modalities with room left, largest share first.
    """
    target = budget.clamp(max=capacity.sum(-1))
    raw = shares * target[:, None].to(shares.dtype)
    counts = raw.floor().long()
    rem = raw - counts
    short = target - counts.sum(-1)  # (B,) >= 0
    order = rem.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    counts = counts + (rank < short[:, None]).long()
    # move overflow to modalities with spare capacity (at most M rounds)
    for _ in range(shares.shape[-1]):
        over = (counts - capacity).clamp_min(0)
        if not over.any():
            break
        counts = counts - over
        spare = capacity - counts
        need = over.sum(-1)
        pref = torch.where(spare > 0, shares + 1.0, torch.zeros_like(shares))
        order = pref.argsort(dim=-1, descending=True, stable=True)
        spare_sorted = spare.gather(-1, order)
        before = spare_sorted.cumsum(-1) - spare_sorted
        give_sorted = (need[:, None] - before).clamp_min(0).minimum(spare_sorted)
        counts = counts + torch.zeros_like(counts).scatter(-1, order, give_sorted)
    return counts


def select_uniform(num_tokens: int, counts: Tensor, valid: Tensor | None, generator: torch.Generator) -> Tensor:
    """Mask (B, num_tokens), True = hidden, with ``counts[b]`` visible tokens drawn uniformly
    without replacement among the ``valid`` ones (all when None)."""
    B = counts.shape[0]
    noise = torch.rand(B, num_tokens, generator=generator, device=counts.device)
    if valid is not None:
        noise = noise.masked_fill(~valid, 2.0)  # invalid tokens sort last
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank >= counts[:, None]


def dirichlet_plan(token_counts: Mapping[str, int], batch_size: int, num_visible: int, alpha: float | Sequence[float] = 1.0,
                   *, generator: torch.Generator, present: Mapping[str, Tensor] | None = None,
                   valid: Mapping[str, Tensor] | None = None, sample_subsets: bool = False,
                   device: torch.device | str = "cpu") -> MaskPlan:
    """MultiMAE masking: ``num_visible`` tokens per sample split across modalities by Dirichlet(alpha).

    Args:
        token_counts: tokens per modality (name -> N), in encoder order.
        alpha: symmetric concentration, or one per modality.
        present: name -> (B,) bool, whether a sample has the modality (missing = all present).
            A sample's absent modality gets no visible token and no share of the budget.
        valid: name -> (B, N) bool, tokens that exist (text padding is invalid, never visible).
        sample_subsets: first draw a uniformly random non-empty subset of the present
            modalities per sample (the official ``sample_tasks_uniformly``).

    The total per sample is exactly ``num_visible`` (or all valid tokens, if fewer exist).
    """
    names = list(token_counts)
    M = len(names)
    if M == 0:
        raise ValueError("dirichlet_plan: no modalities to mask")
    if num_visible < 0:
        raise ValueError(f"num_visible must be >= 0, got {num_visible}")
    alphas = torch.tensor([alpha] * M if isinstance(alpha, (int, float)) else list(alpha), dtype=torch.float64)
    if alphas.numel() != M or (alphas <= 0).any():
        raise ValueError(f"alpha must be positive, one value or one per modality ({M}), got {alpha}")
    pres = torch.ones(batch_size, M, dtype=torch.bool)
    cap = torch.tensor([token_counts[n] for n in names]).expand(batch_size, M).clone()
    for j, n in enumerate(names):
        if present is not None and n in present:
            pres[:, j] = present[n].cpu().bool()
        if valid is not None and n in valid:
            cap[:, j] = valid[n].cpu().sum(1)
    cap = torch.where(pres, cap, torch.zeros_like(cap))
    chosen = pres
    if sample_subsets:
        subsets = torch.tensor(list(itertools.product([0, 1], repeat=M))[1:], dtype=torch.bool)
        pick = subsets[torch.randint(len(subsets), (batch_size,), generator=generator)]
        chosen = pres & pick
        # a subset with none of the present modalities falls back to all present ones
        chosen = torch.where(chosen.any(-1, keepdim=True), chosen, pres)
    conc = torch.where(chosen, alphas.expand(batch_size, M), torch.zeros((), dtype=torch.float64))
    shares = sample_dirichlet(conc, generator)
    counts = _round_to_budget(shares.double(), torch.full((batch_size,), num_visible), cap)
    masks = {}
    for j, n in enumerate(names):
        v = valid[n].cpu().bool() if valid is not None and n in valid else None
        masks[n] = select_uniform(token_counts[n], counts[:, j], v, generator).to(device)
    budget = min(num_visible, sum(token_counts.values()))  # static for a run: the image size fixes the counts
    return MaskPlan(masks, budget, bool((counts.sum(-1) < budget).any()))  # counts: CPU, no device read


def ratio_plan(token_counts: Mapping[str, int], batch_size: int,
               mask_ratio: Mapping[str, float | tuple[float, float]],
               generator: torch.Generator, valid: Mapping[str, Tensor] | None = None,
               present: Mapping[str, Tensor] | None = None, device: torch.device | str = "cpu") -> MaskPlan:
    """M3AE masking: per modality, hide ``round(ratio * n_valid)`` of each sample's valid tokens.

    ``mask_ratio`` names, per modality, a ratio in [0, 1], or a range ``(lo, hi)`` from which
    every sample draws its own ratio uniformly (e.g. ``(0.5, 1.0)`` for captions: the model also
    sees fully masked captions, as when it describes an image from nothing). A modality not named
    is fully visible. Invalid (padding) tokens and absent modalities are always hidden.
    """
    masks, budget = {}, 0
    total = torch.zeros(batch_size, dtype=torch.long)
    for n, N in token_counts.items():
        r = mask_ratio.get(n, 0.0)
        lo, hi = (float(r), float(r)) if isinstance(r, (int, float)) else (float(r[0]), float(r[1]))
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask ratio of {n!r} must be in [0, 1] (a range: 0 <= lo <= hi <= 1), got {r}")
        v = valid[n].cpu().bool() if valid is not None and n in valid else torch.ones(batch_size, N, dtype=torch.bool)
        n_valid = v.sum(1)
        if hi > lo:
            ratio = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        else:
            ratio = torch.full((batch_size,), lo, dtype=torch.float64)
        keep = n_valid - torch.round(n_valid.double() * ratio).long()
        if present is not None and n in present:
            keep = torch.where(present[n].cpu().bool(), keep, torch.zeros_like(keep))
        masks[n] = select_uniform(N, keep, v, generator).to(device)
        total += keep
        budget += N - round(N * lo)  # the most any sample keeps (both round half to even)
    return MaskPlan(masks, budget, bool((total < budget).any()))  # keep: CPU, no device read


def official_explicit_plan(masks: Mapping[str, Tensor]) -> MaskPlan:
    """The tokens the official MultiMAE ``forward(x, task_masks=masks)`` really encodes.

    Given explicit masks, the official code keeps, in every sample, the first ``k`` positions of
    ``argsort(concatenated masks)``, where ``k`` counts the visible tokens of the WHOLE batch; for
    a batch of more than one sample it therefore also encodes masked tokens (ties broken by
    torch's default sort). Use this plan to reproduce official outputs exactly; compute losses
    with the original masks (``model.losses(preds, batch, MaskPlan.from_masks(masks))``).
    masks: name -> (B, N) with 1/True = masked, in the model's input order.
    """
    names = list(masks)
    sizes = [masks[n].shape[1] for n in names]
    mask_all = torch.cat([torch.as_tensor(masks[n]).long() for n in names], dim=1)
    k = int((mask_all == 0).sum())
    ids_keep = torch.argsort(mask_all, dim=1)[:, :k]
    hidden = torch.ones_like(mask_all, dtype=torch.bool).scatter(1, ids_keep, False)
    return MaskPlan(dict(zip(names, hidden.split(sizes, dim=1))), k, False)
