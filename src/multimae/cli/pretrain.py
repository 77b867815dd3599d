"""``multimae pretrain --config FILE [key=value ...]``: parse, build the config, call the library."""
from __future__ import annotations

import argparse
import sys

from multimae.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "pretrain", run, help="pretrain a MultiMAE / M3AE",
                description="Pretrain on the configured data. Overrides are dotted keys, e.g. "
                            "train.max_steps=100 model.preset=small data.root=/data/nyu")
    p.add_argument("--config", help="YAML run config: a path, or a shipped config's name (synthetic-tiny, "
                                    "multimae-b-1600e, ...; see configs/pretrain/)")
    p.add_argument("--resume", help="checkpoint or run directory to resume from (default: the run's latest)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def run(args: argparse.Namespace) -> int:
    from multimae.core.config import ConfigError, load_config, resolve_config_path
    from multimae.tasks.pretrain_config import PretrainConfig

    resume = [f"train.resume={args.resume}"] if args.resume else []
    try:
        path = resolve_config_path(args.config, kind="pretrain") if args.config else None
        cfg = load_config(PretrainConfig, path, [*args.overrides, *resume])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask

    trainer = Trainer(PretrainTask(cfg))
    run_dir = trainer.fit(evaluate=not args.no_eval)  # held-out eval.md + reconstruction.png at the end
    print(f"run directory: {run_dir}") if trainer.info.is_main else None
    return 0
