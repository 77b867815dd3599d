"""End-of-run report: held-out evaluation against baselines, and the reconstruction figure."""
from __future__ import annotations

from typing import Any

from multimae.evaluation.pretrain_eval import evaluate as run_eval, format_eval_rows, write_eval_rows
from multimae.data.loader import BatchSpec, eval_batches
from multimae.data.sources import get_source
from multimae.evaluation.viz import reconstruction_figure, save_png


def finish_run(trainer: Any, evaluate: bool = True, figure: bool = True) -> dict[str, Any]:
    """Evaluate the trained model on held-out data and write ``eval.md`` / ``reconstruction.png``
    into the run directory; prints the table. Returns the paths and rows."""
    out: dict[str, Any] = {}
    model, cfg = trainer.model, trainer.cfg
    batches = []
    source = get_source(cfg.data.source)
    if evaluate and source.held_out:
        # a folder dataset without validation data gives no batches (the data layer said so once)
        batches = eval_batches(BatchSpec.of(model), cfg.data, cfg.mask, cfg.train.seed, batch_size=16)
    if batches:
        rows = run_eval(model, batches)
        n = sum(next(iter(p.masks.values())).shape[0] for _, p in batches)
        what = source.held_out_word
        header = (f"Held-out evaluation after {trainer.step} steps ({n} {what}, "
                  f"{cfg.data.image_size}px). Baselines: per-image target mean (continuous tasks), "
                  "per-image class histogram (ce) and majority class (acc).")
        out["eval"] = write_eval_rows(rows, trainer.run_dir, header)
        out["rows"] = rows
        print(header)
        print(format_eval_rows(rows), flush=True)
        worse = [f"{r.setting}/{r.task}/{r.metric}" for r in rows if not r.better]
        print("model beats the baseline on every task" if not worse else f"baseline NOT beaten on: {worse}")
    fig = reconstruction_figure(model, cfg, num_samples=2) if figure else None
    if fig is not None:
        out["figure"] = save_png(fig, trainer.run_dir / "reconstruction.png")
        print(f"figure: {out['figure']}")
    return out
