"""Argparse pieces the subcommands share (argparse only: ``multimae --help`` imports no torch)."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], help: str,
            description: str | None = None) -> argparse.ArgumentParser:
    """The subcommand ``name``, run as ``func(args)``."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def names(text: str) -> list[str]:
    """A comma list of names (``rgb, depth``) as a list; ``''`` -> ``[]``. An argparse ``type``."""
    return [s.strip() for s in text.split(",") if s.strip()]


def precision_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """``--device`` (unless ``device=False``) and ``--precision``, as :mod:`multimae.core.device` reads them."""
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on a CUDA device with native bf16, else fp32 (multimae.core.device)")
