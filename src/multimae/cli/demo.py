"""``multimae demo --checkpoint RUN [--host 127.0.0.1 --port 7860]``: the interactive browser demo."""
from __future__ import annotations

import argparse
import sys

from multimae.cli.options import command, precision_args


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "demo", run, help="interactive browser demo: mask and edit patches, see every prediction",
                description="Serves a page (bound to 127.0.0.1 unless --host says otherwise) where you pick an input "
                            "(a synthetic scene, a folder dataset sample or an uploaded image), hide patches of each "
                            "input modality, edit rgb hue or semseg classes, and see every task's prediction beside "
                            "its target. Needs the 'demo' extra.")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free one)")
    p.add_argument("--data", default=None, help="folder dataset root to offer samples from (default: the run's own)")
    p.add_argument("--split", default=None, help="split of --data (default: val when it exists)")
    precision_args(p, device=False)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, at most 2)")


def run(args: argparse.Namespace) -> int:
    try:
        from multimae.apps.demo.app import bind, serve
    except ModuleNotFoundError as e:
        print(f"error: the demo needs the 'demo' extra ({e.name} is missing): pip install 'multimae[demo]'",
              file=sys.stderr)
        return 2
    import time

    import torch

    from multimae.apps.demo import DemoError, engine_from_checkpoint
    from multimae.core.config import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    try:
        sock = bind(args.host, args.port)  # first: a taken port fails before the model loads
    except DemoError as e:
        raise ConfigError(str(e)) from e
    with sock:  # closed on every way out, a bad checkpoint included
        try:
            engine = engine_from_checkpoint(args.checkpoint, args.data, args.split, args.precision)
            t0 = time.perf_counter()
            sample = engine.synthetic(0) if "synthetic" in engine.sources else None
            if sample is not None:  # warm up, and tell the user what a request costs here
                hidden = engine.random_mask(sample.id, engine.default_visible, engine.default_alpha, 0)
                engine.predict(sample.id, hidden)
                engine.predict(sample.id, hidden)
        except DemoError as e:
            raise ConfigError(str(e)) from e
        warm = (time.perf_counter() - t0) * 1000
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host}: anyone who can reach this machine can use the demo",
                  file=sys.stderr)

        def ready(url: str) -> None:
            ms = f", one prediction {engine.last_ms:.0f} ms" if engine.last_ms is not None else ""
            print(f"multimae demo: {url}  ({engine.precision}, {torch.get_num_threads()} threads, "
                  f"warm-up {warm:.0f} ms{ms}; Ctrl-C to stop)", flush=True)

        serve(engine, sock, on_ready=ready, host=args.host)
    return 0
