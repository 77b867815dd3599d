"""Loading a trained run for inference and figures (used by ``multimae visualize``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multimae.core.batch import Batch
from multimae.checkpoint import load_meta, load_weights, resolve_checkpoint
from multimae.core.config import from_dict
from multimae.data.codecs import decode_image
from multimae.data.errors import DataError
from multimae.data.loader import BatchSpec, MaskCollator, eval_batches
from multimae.model.multimae import MultiMAE
from multimae.core.seeding import generator
from multimae.tasks.pretrain_config import PretrainConfig, upgrade_saved_config
from multimae.apps.viz import reconstruction_grid, run_vocabulary


def load_pretrain_run(path: str | Path) -> tuple[MultiMAE, PretrainConfig, Path]:
    """Model (eval mode), run config and checkpoint path from a run or checkpoint directory."""
    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    cfg = from_dict(PretrainConfig, upgrade_saved_config(meta["config"]))
    model = MultiMAE(cfg.model)
    model.load_state_dict(load_weights(ckpt))
    return model.eval(), cfg, ckpt


def visualize_heldout(model: MultiMAE, cfg: PretrainConfig, num: int = 3, seed: int = 0) -> torch.Tensor:
    batches = eval_batches(BatchSpec.of(model), cfg.data, cfg.mask, seed, batch_size=num, limit=num)
    if not batches:
        raise DataError(f"the run's data ({cfg.data.source} {cfg.data.root}) has no held-out samples (no "
                        f"{cfg.data.val_split} split, data.val_fraction=0); pass image files with --input")
    batch, plan = batches[0]
    return reconstruction_grid(model, batch, plan, num, vocab=run_vocabulary(model, cfg))


def visualize_files(model: MultiMAE, cfg: PretrainConfig, files: list[str], seed: int = 0) -> torch.Tensor:
    """RGB image files -> figure (random rgb masks, and every other task predicted from rgb)."""
    from multimae.data.transforms import PairedTransform

    source = next(iter(model.input_specs.values()))
    tf = PairedTransform([source], cfg.model.image_size, train=False)
    samples = []
    for f in files:
        try:
            data = Path(f).read_bytes()
        except OSError as e:
            raise DataError(f"image {f}: cannot be read ({e})") from e
        arr = decode_image(data, 3, f"image {f}")  # upright (EXIF), alpha composited
        samples.append(tf({source.key: arr, "__key__": Path(f).stem}))
    batch = Batch({source.key: torch.stack([s[source.key] for s in samples])})
    spec = BatchSpec((source,), (source,), model.config.patch_size, model.config.image_size)
    plan = MaskCollator(spec, cfg.mask, seed).plan(batch, generator(seed, "visualize-files"))
    return reconstruction_grid(model, batch, plan, len(files))
