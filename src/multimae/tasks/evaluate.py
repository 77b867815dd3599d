"""``multimae evaluate``: re-score a saved fine-tuning or linear-probe run on a split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from multimae.tasks.finetune_config import FinetuneConfig


def evaluate_run(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """Re-score a saved fine-tuning or probe run: its config from the checkpoint, ``overrides``
    applied (e.g. ``data.split=test``); writes ``eval-<split>.md/json`` into the run directory and
    returns the result."""
    from multimae.checkpoint import load_meta, load_weights, resolve_checkpoint
    from multimae.checkpoint.convert import load_state_strict
    from multimae.core.config import ConfigError, apply_overrides, from_dict
    from multimae.engine.config import upgrade_saved_config
    from multimae.tasks.finetune_eval import evaluate_model, write_eval_report
    from multimae.tasks.probe import evaluate_probe_weights
    from multimae.model.transfer import TransferModel

    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    if meta.get("kind") not in ("finetune", "probe"):
        raise ConfigError(f"{ckpt} is not a fine-tuning or probe run (meta kind {meta.get('kind')!r}); "
                          "pretraining runs are evaluated at the end of 'multimae pretrain'")
    cfg = from_dict(FinetuneConfig, apply_overrides(upgrade_saved_config(meta["config"]), list(overrides)))
    run_dir = ckpt.parent.parent
    torch.manual_seed(cfg.train.seed)
    model = TransferModel(cfg.model)
    weights = load_weights(ckpt)
    if meta["kind"] == "probe":
        res = evaluate_probe_weights(model, weights, cfg, device)
    else:
        load_state_strict(model, weights, str(ckpt))
        res = evaluate_model(model, cfg, device)
    write_eval_report(res, cfg, run_dir, int(meta["step"]), meta.get("init_report", cfg.init),
                      protocol="linear probe" if meta["kind"] == "probe" else "fine-tune", name=f"eval-{res['split']}")
    return res
