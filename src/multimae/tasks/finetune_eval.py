"""Scoring a fine-tuned model on a split, next to a trivial baseline; ``eval.md`` / ``eval.json``.

Metrics (:mod:`multimae.evaluation.metrics`, accumulated as sums over the whole split, so the
numbers are exact, not means of batch means):

* classification: top-1 (and top-5 with more than 5 classes), %;
* segmentation: mIoU, pixel accuracy and per-class IoU, %, ``ignore_index`` never counted;
* depth: delta1/2/3 (%), AbsRel, RMSE (target units) on valid pixels;
* normals: L1, mean angular error (degrees), % of pixels within 11.25 degrees;
* any other dense target: L1 and RMSE on valid pixels.

The baseline is the best *constant* answer learnt from the training split (up to
``BASELINE_SAMPLES`` of its samples, evaluation transform): the majority class (classification),
the most frequent pixel class (segmentation), the mean valid target (depth: mean depth; normals:
mean normal vector). A fine-tuned model that does not beat it has learnt nothing from the image.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from multimae.core.batch import Batch
from multimae.core.config import to_dict
from multimae.core.io import save_bytes_atomic
from multimae.data.transfer import TARGET, TARGET_VALID
from multimae.evaluation import metrics as metric_fns
from multimae.runs import class_names
from multimae.tasks.transfer import Datasets, dense_target_spec
from multimae.tasks.finetune_config import FinetuneConfig, target_of
from multimae.core.device import autocast

BASELINE_SAMPLES = 512
#: Metric direction, for the "better" column: True = higher is better.
HIGHER_IS_BETTER = {"top1": True, "top5": True, "miou": True, "pixel_acc": True, "delta1": True, "delta2": True,
                    "delta3": True, "absrel": False, "rmse": False, "l1": False, "angular_mean": False,
                    "within_11_25": True}


class Scorer:
    """Accumulates one task's metric sums over batches; ``scores()`` -> {metric: float}."""

    def __init__(self, kind: str, target: str, num_classes: int, ignore_index: int, angular: bool = False) -> None:
        """``angular``: the dense target is a unit vector per pixel (its spec's ``unit_vectors``,
        surface normals), scored by angular error."""
        self.kind, self.target, self.K, self.ignore = kind, target, num_classes, ignore_index
        self.angular = angular
        self.stats: dict[str, Tensor] | None = None
        self.conf: Tensor | None = None

    def update(self, pred: Tensor, batch: dict[str, Any]) -> None:
        """pred: (B, K) logits, (B, K, H, W) logits or (B, C, H, W) values; batch: target (+ valid)."""
        pred = pred.detach().float().cpu()
        t = batch[TARGET]
        if self.kind == "segmentation":
            c = metric_fns.confusion_matrix(pred, t, self.K, self.ignore)
            self.conf = c if self.conf is None else self.conf + c
            return
        if self.kind == "classification":
            s = metric_fns.topk_stats(pred, t, (1, 5) if self.K > 5 else (1,))
        elif self.kind == "depth":
            s = metric_fns.depth_stats(pred, t, batch[TARGET_VALID])
        elif self.angular:
            s = metric_fns.normal_stats(pred, t, batch[TARGET_VALID])
        else:
            v = batch[TARGET_VALID].expand_as(pred)
            d = (pred - t).double()[v]
            s = {"l1": d.abs().sum(), "sq": (d * d).sum(), "count": torch.tensor(float(d.numel()), dtype=torch.float64)}
        self.stats = metric_fns.merge_stats(self.stats, s)

    def scores(self) -> dict[str, float]:
        if self.kind == "segmentation":
            assert self.conf is not None
            s = metric_fns.segmentation_scores(self.conf)
            return {"miou": float(s["miou"]), "pixel_acc": float(s["pixel_acc"])}  # type: ignore[arg-type]
        assert self.stats is not None, "no batch was scored"
        if self.kind == "classification":
            return metric_fns.topk_scores(self.stats)
        if self.kind == "depth":
            return metric_fns.depth_scores_from_stats(self.stats)
        if self.angular:
            return metric_fns.normal_scores_from_stats(self.stats)
        n = max(float(self.stats["count"]), 1.0)
        return {"l1": float(self.stats["l1"]) / n, "rmse": math.sqrt(float(self.stats["sq"]) / n)}

    def per_class(self) -> list[float] | None:
        """Per-class IoU (%) of a segmentation scorer."""
        if self.conf is None:
            return None
        return list(metric_fns.segmentation_scores(self.conf)["per_class_iou"])  # type: ignore[arg-type]


def scorer_for(cfg: FinetuneConfig) -> Scorer:
    spec = dense_target_spec(cfg)
    return Scorer(cfg.model.head.kind, target_of(cfg), int(cfg.model.head.num_classes or 0), cfg.data.ignore_index,
                  angular=spec is not None and spec.unit_vectors)


# ------------------------------------------------------------------------------------ baselines

def fit_baseline(cfg: FinetuneConfig, input_specs: Sequence[Any], limit: int = BASELINE_SAMPLES,
                 datasets: Datasets | None = None) -> dict[str, Any]:
    """The constant answer of the training split: {"kind": "class", "value": c} or
    {"kind": "mean", "value": [per-channel mean]}."""
    from multimae.tasks.finetune_data import build_eval_loader

    kind = cfg.model.head.kind
    K = int(cfg.model.head.num_classes or 0)
    counts = torch.zeros(max(K, 1), dtype=torch.float64)
    sums: Tensor | None = None
    n_px = 0.0
    seen = 0
    for batch in build_eval_loader(cfg, input_specs, train_split_stats=True, limit=limit, datasets=datasets):
        t = batch[TARGET]
        if kind in ("classification", "segmentation"):
            t = t[t != cfg.data.ignore_index] if kind == "segmentation" else t
            counts += torch.bincount(t.flatten(), minlength=K)[:K].double()
        else:
            v = batch[TARGET_VALID].expand_as(t)
            s = (t.double() * v).sum((0, 2, 3))
            sums = s if sums is None else sums + s
            n_px += float(batch[TARGET_VALID].sum())
        seen += batch[TARGET].shape[0]
        if seen >= limit:
            break
    if kind in ("classification", "segmentation"):
        return {"kind": "class", "value": int(counts.argmax())}
    assert sums is not None
    return {"kind": "mean", "value": (sums / max(n_px, 1.0)).tolist()}


def constant_answer(baseline: dict[str, Any], batch: Batch, num_classes: int, kind: str) -> Tensor:
    """The trivial baseline's answer for a batch, shaped like the model's prediction."""
    t = batch[TARGET]
    B = t.shape[0]
    if baseline["kind"] == "class":
        shape = (B, num_classes) if kind == "classification" else (B, num_classes, *t.shape[-2:])
        pred = torch.zeros(shape)
        pred[:, baseline["value"]] = 1.0
        return pred
    mean = torch.tensor(baseline["value"], dtype=torch.float32)
    return mean.view(1, -1, 1, 1).expand(B, -1, *t.shape[-2:]).clone()


def class_baseline(train_y: Tensor, eval_y: Tensor, num_classes: int) -> dict[str, float]:
    """top-1 (/top-5) of always answering the most frequent training class (linear probe)."""
    c = int(torch.bincount(train_y, minlength=num_classes).argmax())
    logits = torch.zeros(len(eval_y), num_classes)
    logits[:, c] = 1.0
    return metric_fns.topk_scores(metric_fns.topk_stats(logits, eval_y, (1, 5) if num_classes > 5 else (1,)))


# ----------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device | str = "cpu",
                   split: str | None = None, baseline: dict[str, Any] | None = None,
                   datasets: Datasets | None = None) -> dict[str, Any]:
    """Score ``model`` on ``split`` (default ``data.eval_split``) and the training-split baseline.

    Returns {"metrics", "baseline", "baseline_answer", "per_class_iou"?, "num_samples", "split"}.
    """
    from multimae.tasks.finetune_data import build_eval_loader

    specs = list(model.input_specs.values())  # type: ignore[union-attr]
    split = split or cfg.data.eval_split
    kind, K = cfg.model.head.kind, int(cfg.model.head.num_classes or 0)
    baseline = baseline or fit_baseline(cfg, specs, datasets=datasets)
    ours, base = scorer_for(cfg), scorer_for(cfg)
    was_training = model.training
    model.eval()
    n = 0
    for batch in build_eval_loader(cfg, specs, split, datasets=datasets):
        with autocast(cfg.train.precision, device):
            pred = model(batch.select([s.key for s in specs]).to(device))
        ours.update(pred, batch)
        base.update(constant_answer(baseline, batch, K, kind), batch)
        n += batch[TARGET].shape[0]
    model.train(was_training)
    out: dict[str, Any] = {"metrics": ours.scores(), "baseline": base.scores(), "baseline_answer": baseline,
                           "num_samples": n, "split": split}
    if kind == "segmentation":
        out["per_class_iou"] = ours.per_class()
        out["baseline_per_class_iou"] = base.per_class()
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def format_metrics_table(res: dict[str, Any]) -> str:
    """Markdown table: metric | model | baseline | better."""
    rows = ["| metric | model | trivial baseline | model better |", "|---|---|---|---|"]
    for k, v in res["metrics"].items():
        b = res["baseline"].get(k)
        hib = HIGHER_IS_BETTER.get(k, True)
        better = "n/a" if b is None else ("yes" if (v > b if hib else v < b) else "NO")
        rows.append(f"| {k} | {_fmt(v)} | {_fmt(b)} | {better} |")
    return "\n".join(rows)


def write_eval_report(res: dict[str, Any], cfg: FinetuneConfig, run_dir: Path, step: int, init: str,
                      protocol: str = "fine-tune", name: str = "eval") -> Path:
    """Write ``<name>.md`` (human) and ``<name>.json`` (machine) into ``run_dir``; prints the table."""
    run_dir = Path(run_dir)
    answer = res.get("baseline_answer")
    names = class_names(cfg.model.head.kind, to_dict(cfg.data))
    if answer and answer["kind"] == "class" and names:
        answer_txt = f"always '{names[answer['value']]}'"
    elif answer and answer["kind"] == "class":
        answer_txt = f"always class {answer['value']}"
    elif answer:
        answer_txt = "the mean training target " + ", ".join(f"{x:.3g}" for x in answer["value"])
    else:
        answer_txt = "the most frequent training class"
    lines = [f"# {protocol}: {cfg.model.head.kind} of '{target_of(cfg)}' from {'+'.join(cfg.model.inputs)}", "",
             f"{protocol} for {step} steps from {init}. Scored on the '{res['split']}' split "
             f"({res['num_samples']} samples, {cfg.data.image_size}px, source {cfg.data.source}); the trivial "
             f"baseline answers {answer_txt} (learnt from the training split).", "", format_metrics_table(res), ""]
    if res.get("per_class_iou"):
        labels = names or [str(i) for i in range(len(res["per_class_iou"]))]
        lines += ["| class | IoU | baseline IoU |", "|---|---|---|"]
        lines += [f"| {c} | {_fmt(a)} | {_fmt(b)} |" for c, a, b in
                  zip(labels, res["per_class_iou"], res.get("baseline_per_class_iou") or [None] * len(labels))]
        lines.append("")
    md = run_dir / f"{name}.md"
    save_bytes_atomic(md, "\n".join(lines).encode())
    save_bytes_atomic(run_dir / f"{name}.json", (json.dumps({**res, "step": step, "init": init}, indent=2) + "\n").encode())
    print("\n".join(lines[2:]), flush=True)
    return md
