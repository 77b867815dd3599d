"""``multimae visualize --checkpoint RUN [--input ...]``: masked input / prediction / target grids."""
from __future__ import annotations

import argparse

from multimae.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "visualize", run, help="figure of masked inputs, predictions and targets",
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from multimae.evaluation.viz import files_figure, heldout_figure, save_png
    from multimae.data.config import DataConfig, MaskConfig
    from multimae.data.errors import DataError
    from multimae.runs import load_run

    run = load_run(args.checkpoint)
    if run.kind != "pretrain":
        raise DataError(f"{run.checkpoint}: a {run.kind} run; visualize draws a pretraining run's predictions")
    data, mask = run.section(DataConfig, "data"), run.section(MaskConfig, "mask")
    if args.input == "heldout":
        fig = heldout_figure(run.model, data, mask, args.seed, args.num)
        if fig is None:
            raise DataError(f"the run's data ({data.source} {data.root}) has no held-out samples (no "
                            f"{data.val_split} split, data.val_fraction=0); pass image files with --input")
    else:
        files = [args.input, *args.files] if args.input != "files" else list(args.files)
        fig = files_figure(run.model, mask, files, args.seed)
    out = Path(args.out) if args.out else run.checkpoint.parent.parent / "visualize.png"
    print(f"figure: {save_png(fig, out)}")
    return 0
