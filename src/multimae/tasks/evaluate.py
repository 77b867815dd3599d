"""``multimae evaluate``: re-score a saved fine-tuning or linear-probe run on a split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from multimae.tasks.finetune_config import FinetuneConfig


def evaluate_run(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """Re-score a saved fine-tuning or probe run: its config from the checkpoint, ``overrides``
    applied (e.g. ``data.eval_split=test``); writes ``eval-<split>.md/json`` into the run directory and
    returns the result."""
    from multimae.core.config import ConfigError, from_dict
    from multimae.runs import load_run
    from multimae.tasks.finetune_eval import evaluate_model, write_eval_report
    from multimae.tasks.probe import evaluate_probe

    run = load_run(path, device, overrides)
    if run.kind not in ("finetune", "probe"):
        raise ConfigError(f"{run.checkpoint} is not a fine-tuning or probe run (meta kind {run.meta.get('kind')!r}); "
                          "pretraining runs are evaluated at the end of 'multimae pretrain'")
    cfg = from_dict(FinetuneConfig, run.config)
    torch.manual_seed(cfg.train.seed)
    if run.kind == "probe":
        res = evaluate_probe(run.model, cfg, run.device)  # type: ignore[arg-type]
    else:
        res = evaluate_model(run.model, cfg, run.device)
    write_eval_report(res, cfg, run.checkpoint.parent.parent, int(run.step or 0), run.meta.get("init_report", cfg.init),
                      protocol="linear probe" if run.kind == "probe" else "fine-tune", name=f"eval-{res['split']}")
    return res
