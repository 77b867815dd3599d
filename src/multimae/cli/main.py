"""``multimae`` console entry point: a dispatcher over thin subcommand modules."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# module name under multimae.cli -> each registers one or more subcommands
# (each imports only argparse at its top: the library is imported after parsing, so ``--help`` and
# argument errors never import torch)
_SUBCOMMAND_MODULES = ["pretrain", "visualize", "data", "tokenizer", "demo", "convert", "pseudolabel", "finetune",
                       "export", "predict", "submit"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimae", description="Multi-modal multi-task masked autoencoders (MultiMAE, M3AE)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _SUBCOMMAND_MODULES:
        importlib.import_module(f"multimae.cli.{mod}").register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from multimae.checkpoint import CheckpointError
    from multimae.checkpoint.convert import ConversionError
    from multimae.core.config import ConfigError
    from multimae.core.io import WriteError
    from multimae.data.errors import DataError
    from multimae.engine.identity import RunLockedError

    return (CheckpointError, ConversionError, ConfigError, DataError, FileNotFoundError, RunLockedError, WriteError)


def _run_stops() -> tuple[type[BaseException], ...]:
    from multimae.engine.signals import Preempted
    from multimae.engine.step import NonFiniteLossError

    return (Preempted, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except _user_errors() as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _run_stops() as e:  # a signal (checkpoint saved: exit 75) or a non-finite step (exit 1)
        if os.environ.get("RANK", "0") == "0":  # one message, not one per rank
            print(f"{'stopped' if getattr(e, 'exit_code', None) else 'error'}: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
