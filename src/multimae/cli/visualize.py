"""``multimae visualize --checkpoint RUN [--input ...]``: masked input / prediction / target grids."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="figure of masked inputs, predictions and targets",
                       description="Loads a checkpoint (a run directory -> its latest) and draws, per modality, "
                                   "the masked input, the prediction and the target, for random masks and for "
                                   "cross-modal prediction from the first input modality alone.")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--input", default="heldout",
                   help="'heldout' (the run's held-out data), or image files (rgb only: cross-modal predictions)")
    p.add_argument("--num", type=int, default=3, help="samples to draw (heldout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--out", default=None, help="PNG path (default: <run>/visualize.png)")
    p.add_argument("files", nargs="*", help="image files when --input=files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from multimae.tasks.inference import load_pretrain_run, visualize_files, visualize_heldout
    from multimae.apps.viz import save_png

    model, cfg, ckpt = load_pretrain_run(args.checkpoint)
    if args.input == "heldout":
        fig = visualize_heldout(model, cfg, args.num, args.seed)
    else:
        files = [args.input, *args.files] if args.input != "files" else list(args.files)
        fig = visualize_files(model, cfg, files, args.seed)
    out = Path(args.out) if args.out else ckpt.parent.parent / "visualize.png"
    print(f"figure: {save_png(fig, out)}")
    return 0
