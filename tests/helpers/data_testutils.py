"""Helpers shared by the data tests (imported from the test files' directory)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from multimae.core import modalities
from multimae.data.synthetic import SPEC_OVERRIDES

NAMES = ["rgb", "depth", "semseg", "normals", "caption"]


def specs(names: list[str] = NAMES) -> list[modalities.ModalitySpec]:
    """Registered specs adapted to the synthetic scenes (semseg with their class count)."""
    return modalities.resolve(names, SPEC_OVERRIDES)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr))
    return path


def official_folder(root: Path, n: int = 4, size: int = 16, split: str = "train", cls: str = "all") -> Path:
    """A folder dataset written like the official layout: 8-bit rgb, 16-bit depth, 8-bit semseg PNGs."""
    rng = np.random.default_rng(0)
    for i in range(n):
        write_png(root / split / "rgb" / cls / f"{i:04d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        write_png(root / split / "depth" / cls / f"{i:04d}.png", rng.integers(1, 65536, (size, size), dtype=np.uint16))
        write_png(root / split / "semseg" / cls / f"{i:04d}.png", rng.integers(0, 6, (size, size), dtype=np.uint8))
    return root


# ----------------------------------------------------------------------------- incomplete datasets
PARTIAL_N = 12


def lacks_depth(i: int) -> bool:
    return i % 2 == 0  # half the samples


def lacks_semseg(i: int) -> bool:
    return i % 3 == 0  # a third


def partial_folder(root, n: int = PARTIAL_N):
    """A synthetic folder dataset (32 px) where every sample has rgb, sample i lacks depth when
    :func:`lacks_depth` and semseg when :func:`lacks_semseg`. Returns ``root``."""
    from multimae.data.folder import write_folder
    from multimae.data.synthetic import SyntheticScenes

    write_folder(SyntheticScenes(n, image_size=32, seed=2, modalities=["rgb", "depth", "semseg"]), root, "train")
    for i, f in enumerate(sorted((root / "train" / "rgb" / "all").iterdir())):
        if lacks_depth(i):
            (root / "train" / "depth" / "all" / f.name).unlink()
        if lacks_semseg(i):
            (root / "train" / "semseg" / "all" / f.name).unlink()
    return root
