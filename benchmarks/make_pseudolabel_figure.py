"""Figure for the README: images, their pseudo depth and pseudo semseg, exactly as written to disk by
``multimae pseudolabel`` and read back with FolderDataset.

The labeller is a MultiMAE of this library (rgb in; depth and semseg out) trained on synthetic scenes;
docs/img/pseudolabel.png used the quick-start run (``make run``) at step 400 of 768. Rows: synthetic
scenes it never saw in training (in-domain), then a scikit-image photo (out of domain: the model only
knows rooms of boxes, cones, cylinders and spheres).

    python benchmarks/make_pseudolabel_figure.py --labeler runs/synthetic-tiny/checkpoints/step-000000400 [--out docs/img/pseudolabel.png]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from multimae.data.folder import FolderDataset
from multimae.data.synthetic import SyntheticScenes
from multimae.apps.pseudolabel import build_labelers, pseudolabel
from multimae.evaluation.viz import colormap, palette

TILE = 160


def tile(img: Tensor, text: str) -> np.ndarray:  # noqa: F821 (torch.Tensor)
    """(3,H,W) float in [0,1] -> a TILE-high uint8 tile keeping the aspect ratio, with a caption."""
    arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    h, w = arr.shape[:2]
    im = Image.fromarray(arr).resize((max(1, round(w * TILE / h)), TILE), Image.NEAREST)
    ImageDraw.Draw(im).text((3, 2), text, fill=(255, 255, 255))
    return np.asarray(im)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labeler", default="runs/synthetic-tiny", help="a multimae run or checkpoint directory")
    ap.add_argument("--out", default="docs/img/pseudolabel.png")
    args = ap.parse_args()
    from skimage import data

    with tempfile.TemporaryDirectory() as d:
        photos = Path(d) / "photos"
        photos.mkdir()
        scenes = SyntheticScenes(2, image_size=(128, 160), seed=12345, modalities=["rgb"])
        for i in range(2):
            Image.fromarray(scenes[i]["rgb"].permute(1, 2, 0).numpy()).save(photos / f"a-synthetic-{i}.png")
        Image.fromarray(data.astronaut()).resize((160, 160)).save(photos / "b-astronaut.png")
        labelers = build_labelers(args.labeler, args.labeler, device="cpu")
        pseudolabel(photos, Path(d) / "out", labelers, progress=False)
        ds = FolderDataset(Path(d) / "out", "train",
                           ["rgb", "depth", {"name": "semseg", "num_classes": labelers[0].model.output_specs["semseg"].num_classes}])
        rows = []
        for i in range(len(ds)):
            s = ds[i]
            dep = s["depth"][0]
            lo, hi = torch.quantile(dep.flatten(), 0.02), torch.quantile(dep.flatten(), 0.98)
            pal = palette(ds.specs["semseg"].num_classes)
            tiles = [tile(s["rgb"].float() / 255, s["__key__"].split("/")[-1]),
                     tile(colormap((dep - lo) / (hi - lo + 1e-6)), "pseudo depth"),
                     tile(pal[s["semseg"]].permute(2, 0, 1), "pseudo semseg")]
            rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
