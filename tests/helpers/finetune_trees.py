"""Small downstream folder trees and a tiny ``multimae finetune`` call, shared by the hostile
fine-tuning dataset tests and the fine-tuning tests (on sys.path from tests/conftest.py)."""
import numpy as np
from PIL import Image

from multimae.cli.main import main
from tiny import tiny_encoder_override

TINY = [tiny_encoder_override(depth=1),
        "data.image_size=32", "data.num_workers=0", "train.batch_size=2", "train.eval_batch_size=4",
        "train.epochs=1", "train.max_steps=2", "train.log_every=1", "train.precision=fp32", "model.drop_path=0",
        "aug.randaugment=false", "aug.mixup=0", "aug.cutmix=0"]
SEG = ["model.head.embed_dim=32", "model.head.num_classes=4"]


def png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rgb(i, h=32, w=32):
    g = np.random.default_rng(i)
    return g.integers(0, 255, (h, w, 3), dtype=np.uint8)


def cls_tree(root, splits):
    """splits: {split: {class: n}} -> root/<split>/rgb/<class>/<i>.png"""
    for split, classes in splits.items():
        for c, n in classes.items():
            d = root / split / "rgb" / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                png(d / f"{c}{i}.png", rgb(hash((split, c, i)) % 1000))


def seg_tree(root, splits, n=4, size=32):
    for split in splits:
        for i in range(n):
            png(root / split / "rgb" / "all" / f"s{i}.png", rgb(i, size, size))
            png(root / split / "semseg" / "all" / f"s{i}.png", np.full((size, size), i % 4, np.uint8))


def finetune(tmp_path, config, root, *extra):
    return main(["finetune", "--config", f"configs/finetune/{config}.yaml", *TINY, f"data.root={root}",
                 f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r", *extra])
