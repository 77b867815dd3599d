"""``multimae convert SRC DST [--to multimae|timm] [--image-size N]``: parse, call the library, print the report."""
from __future__ import annotations

import argparse
import json

from multimae.cli.options import command, names


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub, "convert", run,
        help="convert weights: MultiMAE / official / MAE / timm -> a pretrained directory or a timm ViT",
        description="SRC: a save_pretrained directory, a run or checkpoint directory, an official MultiMAE or "
                    "MAE .pth, a timm ViT .pth/.safetensors, or a transformers ViT / ViTMAE directory. DST: a "
                    "directory (--to multimae), a .safetensors file (--to timm: the rgb encoder as a timm "
                    "VisionTransformer state dict) or a directory (--to transformers: a ViTMAEModel).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["multimae", "timm", "transformers"], default="multimae",
                   help="transformers: a ViTMAEModel directory (config.json + model.safetensors)")
    p.add_argument("--image-size", type=int, help="fit the position tables to this image size")
    p.add_argument("--inputs", type=names, help="comma list of input modalities to keep (e.g. rgb)")
    p.add_argument("--outputs", type=names, help="comma list of output tasks to keep; '' = encoder only")
    p.add_argument("--num-heads", type=int, help="encoder heads of an external checkpoint (not stored in weights)")
    p.add_argument("--input", default="rgb", help="--to timm: the image input to export (default rgb)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from multimae.model.multimae import MultiMAE

    given = {"inputs": args.inputs, "outputs": args.outputs, "num_heads": args.num_heads or None,
             "image_size": (args.image_size or None) if args.to == "multimae" else None}
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.to in ("timm", "transformers"):
        overrides.setdefault("outputs", [])
    model, report = MultiMAE.from_pretrained(args.src, with_report=True, **overrides)
    print("\n".join(report.lines()))
    dst = Path(args.dst)
    if args.to == "multimae":
        model.save_pretrained(dst)
        print(f"wrote {dst}/ (config.json, model.safetensors, README.md); load with "
              f"MultiMAE.from_pretrained({str(dst)!r})")
        return 0
    if args.to == "transformers":
        from multimae.checkpoint.vit import to_transformers_vitmae

        out, export = to_transformers_vitmae(model, dst, args.input)
        print("\n".join(export.lines()))
        print(f"wrote {out}/ (config.json, model.safetensors); load with\n"
              f"  transformers.ViTMAEModel.from_pretrained({str(out)!r})  "
              "# pass noise=torch.arange(N).expand(B, N) to keep the patch order")
        return 0
    from safetensors.torch import save_file

    from multimae.checkpoint.vit import to_timm_state_dict
    from multimae.core.config import ConfigError
    from multimae.core.io import save_file_atomic

    if dst.suffix != ".safetensors":
        raise ConfigError(f"--to timm writes a .safetensors file; got {dst}")
    sd, kwargs, export = to_timm_state_dict(model, args.input, args.image_size)
    meta = {"format": "pt", "timm_kwargs": json.dumps(kwargs)}
    save_file_atomic(dst, lambda p: save_file(sd, str(p), metadata=meta))
    print("\n".join(export.lines()))
    name = kwargs.pop("model_name", None)
    build = (f"timm.create_model({name!r}, pretrained=False, num_classes=0, img_size={kwargs['img_size']})" if name
             else f"timm.models.vision_transformer.VisionTransformer(**{kwargs})")
    print(f"wrote {dst} ({len(sd)} tensors); load with\n  vit = {build}\n"
          f"  vit.load_state_dict(safetensors.torch.load_file({str(dst)!r}))")
    return 0
