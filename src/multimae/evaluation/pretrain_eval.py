"""Held-out evaluation of a pretrained MultiMAE against trivial baselines.

Two settings: (1) masked reconstruction with the run's masking, every task; (2) cross-modal
prediction from the first input modality alone (rgb in the MultiMAE configs): every other task
predicted from all of its tokens. Baselines: the per-image mean of the target (continuous
tasks) and the per-image class histogram / majority class (categorical tasks).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from multimae.core.batch import Batch
from multimae.core.io import save_bytes_atomic
from multimae.model.losses import norm_pix
from multimae.core.masking import MaskPlan
from multimae.model.multimae import MultiMAE
from multimae.core.modalities import ModalitySpec


@dataclass
class EvalRow:
    setting: str
    task: str
    metric: str
    model: float
    baseline: float

    @property
    def better(self) -> bool:
        return self.model > self.baseline if self.metric == "acc" else self.model < self.baseline


def per_image_baseline(spec: ModalitySpec, target: Tensor, patch: int) -> Tensor:
    """The trivial prediction for a target: per-image channel mean (after norm-pix if the task
    uses it), or log per-image class frequencies for class maps. Same shape as the model's."""
    if spec.kind in ("text", "categorical"):
        t = target[:, 0] if target.ndim == 4 else target
        hist = torch.stack([torch.bincount(x.flatten(), minlength=spec.num_classes) for x in t]).float()
        log_freq = (hist / hist.sum(1, keepdim=True)).clamp_min(1e-6).log()
        if spec.kind == "text":  # the caption's own token histogram at every position
            return log_freq[:, None, :].expand(-1, t.shape[1], -1)
        return log_freq[:, :, None, None].expand(-1, -1, *t.shape[-2:])
    t = norm_pix(target.float(), patch) if spec.norm_pix else target.float()
    return t.mean((2, 3), keepdim=True).expand_as(t).contiguous()


def _majority_accuracy(target: Tensor) -> float:
    acc = [float((x == torch.mode(x.flatten()).values).float().mean()) for x in target]
    return sum(acc) / len(acc)


def _position_mode_accuracy(tokens: Tensor, real: Tensor) -> float:
    """Accuracy of predicting, at every position, the batch's most frequent token there."""
    hits = 0
    for j in range(tokens.shape[1]):
        r = real[:, j]
        if r.any():
            col = tokens[r, j]
            hits += int((col == torch.mode(col).values).sum())
    return hits / max(1, int(real.sum()))


@torch.no_grad()
def evaluate(model: MultiMAE, batches: Iterable[tuple[Batch | dict[str, Any], MaskPlan]]) -> list[EvalRow]:
    """Average metrics over ``(batch, plan)`` pairs (plan: the masked-reconstruction masks), each
    batch weighted by the samples a metric covered: a sample lacking a target modality
    (``Batch.present``) is not scored for it, one lacking the source modality not in the
    cross-modal setting."""
    model.eval()
    p = model.config.patch_size
    source = next(iter(model.input_specs.values()))
    sums: dict[tuple[str, str, str], list[float]] = {}

    def add(setting: str, task: str, metric: str, m: float, b: float, w: int) -> None:
        acc = sums.setdefault((setting, task, metric), [0.0, 0.0, 0])
        acc[0] += m * w
        acc[1] += b * w
        acc[2] += w

    for batch, plan in batches:
        batch = Batch.of(batch)
        base = {t: per_image_baseline(s, batch[s.key], s.patch(p)) for t, s in model.output_specs.items()
                if s.key in batch}
        out = model(batch, plan)
        base_l = model.losses(base, batch, out.plan)
        for t, l in out.losses.items():  # weighted by the samples each loss covered (targets present)
            add("masked", t, model.output_specs[t].loss, float(l), float(base_l[t]), int(out.counts[t]))
        # every other input present but fully hidden: the same as leaving it out for spatial
        # decoders, and it gives text decoders their (masked) positions
        if source.key in batch.present:  # a sample lacking the source has nothing to predict from
            keep = batch.present[source.key].nonzero().flatten()
            if keep.numel() == 0:
                continue
            batch, plan = batch.rows(keep), MaskPlan({n: m[keep] for n, m in plan.masks.items()})
            base = {t: v[keep] for t, v in base.items()}
        hide = {n: torch.ones_like(m) if n != source.name else torch.zeros_like(m) for n, m in plan.masks.items()}
        out = model(batch, MaskPlan(hide), compute_loss=False)
        cross = {t: v for t, v in out.preds.items() if model.output_specs[t].key != source.key}
        counts: dict[str, Tensor] = {}
        ls = model.losses(cross, batch, out.plan, counts=counts)
        lb = model.losses({t: base[t] for t in ls}, batch, out.plan)
        for t in ls:
            spec = model.output_specs[t]
            setting = f"from {source.name} only"
            n = int(counts[t])
            add(setting, t, spec.loss, float(ls[t]), float(lb[t]), n)
            tgt = batch[spec.key]
            has = batch.present[spec.key] if spec.key in batch.present else torch.ones(batch.size, dtype=torch.bool)
            if spec.kind == "categorical" and bool(has.any()):
                acc = float((cross[t][has].argmax(1) == tgt[has]).float().mean())
                add(setting, t, "acc", acc, _majority_accuracy(tgt[has]), int(has.sum()))
            elif spec.kind == "text":
                real = ~batch.absent(spec.key, tgt.shape[1])
                if bool(real.any()):
                    hit = (cross[t].argmax(-1) == tgt) & real
                    add(setting, t, "acc", float(hit.sum() / real.sum()), _position_mode_accuracy(tgt, real), n)
    return [EvalRow(s, t, m, v[0] / v[2], v[1] / v[2]) for (s, t, m), v in sums.items() if v[2] > 0]


def format_eval_rows(rows: list[EvalRow]) -> str:
    lines = ["| setting | task | metric | model | baseline | beats baseline |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.task} | {r.metric} | {r.model:.4f} | {r.baseline:.4f} | "
                     f"{'yes' if r.better else 'NO'} |")
    return "\n".join(lines)


def write_eval_rows(rows: list[EvalRow], run_dir: Path, header: str = "") -> Path:
    save_bytes_atomic(run_dir / "eval.json", json.dumps([asdict(r) | {"better": r.better} for r in rows], indent=2).encode())
    path = run_dir / "eval.md"
    save_bytes_atomic(path, ((header + "\n\n" if header else "") + format_eval_rows(rows) + "\n").encode())
    return path
