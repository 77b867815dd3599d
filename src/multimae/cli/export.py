"""``multimae export --onnx OUT.onnx --checkpoint RUN``: a transfer model or an encoder to ONNX."""
from __future__ import annotations

import argparse

from multimae.cli.options import command, names


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub, "export", run,
        help="export a fine-tuned model or an encoder to ONNX (dynamic batch, checked with onnxruntime)",
        description="CHECKPOINT: a fine-tuning or probe run (its head is exported), or with --encoder-only / any "
                    "pretraining run, save_pretrained directory or official / MAE / timm weights: the encoder "
                    "(output: every token). Inputs are the model-ready tensors (rgb ImageNet-normalised, depth "
                    "robust-standardised); the image size is the run's; the batch axis is dynamic.")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--checkpoint", required=True, help="run, checkpoint directory or weights")
    p.add_argument("--inputs", type=names, help="comma list of input modalities (encoder export; default: the run's)")
    p.add_argument("--encoder-only", action="store_true", help="export the encoder of a fine-tuning run")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run(args: argparse.Namespace) -> int:
    from multimae.apps.export import export_onnx

    info = export_onnx(args.checkpoint, args.onnx, inputs=args.inputs or None, encoder_only=args.encoder_only,
                       opset=args.opset, check=not args.no_check)
    print(info.summary())
    return 0
