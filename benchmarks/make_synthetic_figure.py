"""Regenerate docs/img/synthetic-samples.png: synthetic scenes with depth, segmentation, normals, captions.

    python benchmarks/make_synthetic_figure.py [--out docs/img/synthetic-samples.png] [--seed 0]

Composed with PIL only (no matplotlib).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from multimae.data.synthetic import LABEL_CLASSES, SEMSEG_CLASSES, SyntheticScenes

TILE = 176
PAD = 6
PALETTE = np.array([[150, 130, 110], [205, 205, 200], [230, 60, 50], [250, 190, 40], [60, 170, 90], [70, 110, 230]],
                   np.uint8)  # floor, wall, box, cone, cylinder, sphere
_ANCHORS = np.array([[252, 253, 191], [252, 137, 97], [183, 55, 121], [81, 18, 124], [0, 0, 4]], np.float64)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H,W) metres -> (H,W,3) uint8, near bright, far dark (a magma-like ramp)."""
    inv = 1.0 / np.maximum(depth, 1e-3)
    x = (inv.max() - inv) / max(inv.max() - inv.min(), 1e-9) * (len(_ANCHORS) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_ANCHORS) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _ANCHORS[i] + f * _ANCHORS[i + 1]).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def make_figure(indices: list[int], seed: int) -> Image.Image:
    ds = SyntheticScenes(max(indices) + 1, image_size=TILE, seed=seed)
    font, small = _font(14), _font(12)
    cols = ["rgb", "depth", "semseg", "normals"]
    caption_h = 40
    width = PAD + len(cols) * (TILE + PAD)
    height = 24 + len(indices) * (TILE + caption_h + PAD) + 44
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    for c, name in enumerate(cols):
        draw.text((PAD + c * (TILE + PAD) + 4, 4), name, fill="black", font=font)
    for r, idx in enumerate(indices):
        s = ds[idx]
        tiles = [
            s["rgb"].permute(1, 2, 0).numpy(),
            colorize_depth(s["depth"][0].numpy()),
            PALETTE[s["semseg"].numpy()],
            ((s["normals"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8),
        ]
        y = 24 + r * (TILE + caption_h + PAD)
        for c, tile in enumerate(tiles):
            fig.paste(Image.fromarray(tile), (PAD + c * (TILE + PAD), y))
        text = f"[{LABEL_CLASSES[int(s['label'])]}] {s['caption']}"
        for k, line in enumerate(textwrap.wrap(text, width=100)[:3]):
            draw.text((PAD, y + TILE + 2 + 13 * k), line, fill="black", font=small)
    y = height - 40
    x = PAD
    for cls, color in zip(SEMSEG_CLASSES, PALETTE):
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in color), outline="black")
        draw.text((x + 16, y - 1), cls, fill="black", font=small)
        x += 24 + int(draw.textlength(cls, font=small))
    draw.text((PAD, y + 17), "depth: near bright, far dark.  normals: (n+1)/2, camera frame.  [image-level label]",
              fill="black", font=small)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "docs" / "img" / "synthetic-samples.png"
    ap.add_argument("--out", default=str(default))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--indices", default="0,2,5,7")
    args = ap.parse_args(argv)
    fig = make_figure([int(i) for i in args.indices.split(",")], args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.save(args.out, optimize=True)
    print(f"wrote {args.out} ({fig.width}x{fig.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
