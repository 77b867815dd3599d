"""``multimae finetune`` / ``evaluate`` / ``probe``: parse, build the config, call the library.

    multimae finetune --config configs/finetune/synthetic-cls.yaml init=runs/synthetic-tiny [k=v ...]
    multimae evaluate --checkpoint runs/<finetune-run> [data.eval_split=test]
    multimae probe --config configs/finetune/synthetic-probe.yaml init=runs/synthetic-tiny
"""
from __future__ import annotations

import argparse
import sys

from multimae.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "finetune", run_finetune, help="fine-tune a pretrained (or fresh) encoder with a task head",
                description="Fine-tune on the configured downstream task. init=scratch | a pretraining run "
                            "| a checkpoint | an official .pth. Overrides are dotted keys, e.g. "
                            "init=runs/synthetic-tiny train.epochs=5 model.inputs=[rgb,depth]")
    p.add_argument("--config", help="YAML run config (configs/finetune/*.yaml)")
    p.add_argument("--resume", help="checkpoint or run directory to resume from (default: the run's latest)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (init=... included)")

    e = command(sub, "evaluate", run_evaluate, help="score a fine-tuning (or probe) run on a split",
                description="Re-evaluate a saved fine-tuning or linear-probe run, e.g. on its test split: "
                            "multimae evaluate --checkpoint runs/X data.eval_split=test. Writes eval-<split>.md "
                            "and eval-<split>.json into the run directory.")
    e.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    e.add_argument("overrides", nargs="*", help="dotted overrides of the run's config (data.eval_split=test, ...)")

    q = command(sub, "probe", run_probe, help="linear probe: frozen encoder, cached features, BatchNorm + linear",
                description="Linear-probe an encoder on a classification task (configs/finetune/*probe*.yaml).")
    q.add_argument("--config", help="YAML run config")
    q.add_argument("overrides", nargs="*", help="dotted key=value overrides (init=... included)")


def _load(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from multimae.core.config import ConfigError, load_config
    from multimae.tasks.finetune_config import FinetuneConfig

    try:
        return load_config(FinetuneConfig, args.config, [*args.overrides, *extra])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def run_finetune(args: argparse.Namespace) -> int:
    cfg = _load(args, (f"train.resume={args.resume}",) if args.resume else ())
    if cfg is None:
        return 2
    from multimae.engine.trainer import Trainer
    from multimae.tasks.finetune import FinetuneTask

    trainer = Trainer(FinetuneTask(cfg))
    run_dir = trainer.fit()
    if trainer.info.is_main:
        print(f"run directory: {run_dir}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError
    from multimae.tasks.evaluate import evaluate_run

    try:
        evaluate_run(args.checkpoint, list(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def run_probe(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    from multimae.tasks.probe import run_probe as probe

    run_dir, _ = probe(cfg)
    print(f"run directory: {run_dir}")
    return 0
