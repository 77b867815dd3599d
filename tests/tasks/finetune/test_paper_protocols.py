"""The paper-protocol configs (configs/finetune/{nyuv2-*,ade20k-semseg,in1k-cls}.yaml): their
official evaluation conventions, and 2 steps of ``multimae finetune`` with each on a tiny dataset in
the layout ``multimae data prepare`` writes (+ ``multimae evaluate`` on one run)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimae.cli.main import main as cli
from multimae.core.config import load_config
from multimae.data.transfer import TARGET
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.finetune_data import build_transform
from multimae.model.transfer import TransferModel
from tiny import tiny_encoder_override

TINY_ENC = tiny_encoder_override(dim=48)


def _specs(cfg):
    return list(TransferModel(cfg.model).input_specs.values())


def test_nyuv2_depth_evaluates_on_the_centre_crop():
    """Official NYUv2 depth evaluation: shorter side resized + centre square, so the left / right
    borders of a 4:3 image are never scored (the letterbox default would score them)."""
    cfg = load_config(FinetuneConfig, "configs/finetune/nyuv2-depth.yaml", [TINY_ENC, "model.head.hooks=null",
                                                                            "data.image_size=16"])
    depth = torch.full((1, 16, 24), 9.0)
    depth[..., 4:20] = 2.0  # the centre 16x16 square
    raw = {"rgb": torch.zeros(3, 16, 24, dtype=torch.uint8), "depth": depth, "__key__": "a"}
    out = build_transform(cfg, _specs(cfg), train=False)(raw)
    assert out[TARGET].shape == (1, 16, 16)
    assert torch.allclose(out[TARGET], torch.tensor(2.0))
    auto = load_config(FinetuneConfig, "configs/finetune/nyuv2-depth.yaml", [TINY_ENC, "model.head.hooks=null",
                                                                             "data.image_size=16", "data.eval_transform=auto"])
    assert (build_transform(auto, _specs(auto), train=False)(raw)[TARGET] > 5).any()


def test_nyuv2_depth_trains_on_random_squares_of_the_shorter_side():
    """Official NYUv2 depth training crop: shorter side resized to S, a random S x S crop (no
    rescaling): every crop spans the full height of a landscape image, at random horizontal offsets."""
    from multimae.data.transforms import PairedTransform

    tf = PairedTransform(["rgb"], 16, train=True, train_crop="shorter_side")
    g = torch.Generator().manual_seed(0)
    boxes = [tf.params(48, 64, g)[0] for _ in range(50)]
    assert all(b[0] == 0 and b[2] == 48 and b[3] == 48 for b in boxes)
    assert len({b[1] for b in boxes}) > 5 and all(0 <= b[1] <= 16 for b in boxes)
    cfg = load_config(FinetuneConfig, "configs/finetune/nyuv2-depth.yaml", [TINY_ENC, "model.head.hooks=null"])
    assert build_transform(cfg, _specs(cfg), train=True).input_tf.train_crop == "shorter_side"


def test_colour_jitter_and_grayscale_reach_the_training_rgb():
    cfg = load_config(FinetuneConfig, "configs/finetune/nyuv2-depth.yaml", [TINY_ENC, "model.head.hooks=null",
                                                                            "data.image_size=16", "aug.grayscale_prob=1.0"])
    rgb = torch.zeros(3, 16, 16, dtype=torch.uint8)
    rgb[0] = 200  # saturated red
    raw = {"rgb": rgb, "depth": torch.ones(1, 16, 16), "__key__": "a"}
    out = build_transform(cfg, _specs(cfg), train=True)(raw, generator=torch.Generator().manual_seed(0))["rgb"]
    spec = _specs(cfg)[0]
    pix = out * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)
    assert float((pix.amax(0) - pix.amin(0)).max()) < 0.02  # grey: the channels agree
    off = load_config(FinetuneConfig, "configs/finetune/nyuv2-depth.yaml", [TINY_ENC, "model.head.hooks=null",
                                                                            "data.image_size=16", "aug.color_jitter=null",
                                                                            "aug.grayscale_prob=0.0"])
    out = build_transform(off, _specs(off), train=True)(raw, generator=torch.Generator().manual_seed(0))["rgb"]
    assert float(out[0].mean() - out[1].mean()) > 1.0  # still red


def test_in1k_evaluates_on_the_central_87_5_percent():
    """Official ImageNet evaluation: resize to size / 0.875, centre crop: a 2-px frame of a 32-px
    image (12.5% of the side) is cut away."""
    cfg = load_config(FinetuneConfig, "configs/finetune/in1k-cls.yaml", [TINY_ENC, "data.image_size=28"])
    rgb = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    rgb[:, 2:30, 2:30] = 0
    out = build_transform(cfg, _specs(cfg), train=False)({"rgb": rgb, "label": 0, "__key__": "a"})["rgb"]
    spread = lambda x: float((x.amax((1, 2)) - x.amin((1, 2))).max())  # per channel
    assert out.shape == (3, 28, 28) and spread(out) < 1e-5
    full = load_config(FinetuneConfig, "configs/finetune/in1k-cls.yaml", [TINY_ENC, "data.image_size=28",
                                                                         "data.eval_crop_pct=1.0"])
    out = build_transform(full, _specs(full), train=False)({"rgb": rgb, "label": 0, "__key__": "a"})["rgb"]
    assert spread(out) > 1.0


def test_semseg_protocols_letterbox_and_ignore_the_padding():
    cfg = load_config(FinetuneConfig, "configs/finetune/ade20k-semseg.yaml", [TINY_ENC, "data.image_size=16"])
    raw = {"rgb": torch.zeros(3, 8, 16, dtype=torch.uint8), "semseg": torch.full((8, 16), 3, dtype=torch.int64),
           "__key__": "a"}
    t = build_transform(cfg, _specs(cfg), train=False)(raw)[TARGET]
    assert (t[:8] == 3).all() and (t[8:] == 255).all()  # image at the top, padding never scored


def test_bad_eval_crop_pct_is_named():
    cfg = load_config(FinetuneConfig, "configs/finetune/in1k-cls.yaml", [TINY_ENC, "data.eval_crop_pct=1.5"])
    with pytest.raises(ValueError, match="eval_crop_pct"):
        build_transform(cfg, _specs(cfg), train=False)


# ------------------------------------------------------------------ 2 steps through the CLI

def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _nyuv2(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            _png(root / split / "rgb" / "all" / f"{i:04d}.png", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
            depth = rng.integers(500, 9000, (24, 32)).astype(np.uint16)  # millimetres
            depth[0, :4] = 0  # invalid
            _png(root / split / "depth" / "all" / f"{i:04d}.png", depth)
            sem = rng.integers(0, 40, (24, 32), dtype=np.uint8)
            sem[-2:] = 255  # unlabeled
            _png(root / split / "semseg" / "all" / f"{i:04d}.png", sem)
    (root / "multimae_data.json").write_text(json.dumps({"format": "multimae-folder", "version": 1,
                                                         "png_scale": {"depth": 0.001}}))


def _ade20k(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            h, w = (20 + 4 * i, 36 - 2 * i)  # own sizes
            _png(root / split / "rgb" / "all" / f"ADE_{i:04d}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            _png(root / split / "semseg" / "all" / f"ADE_{i:04d}.png", rng.integers(0, 150, (h, w), dtype=np.uint8))


def _imagenet(root: Path) -> None:
    rng = np.random.default_rng(2)
    for split, n in (("train", 2), ("val", 1)):
        for wnid in ("n01440764", "n01443537"):
            for i in range(n):
                _png(root / split / "rgb" / wnid / f"{wnid}_{i}.png", rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))


CONFIGS = {
    "nyuv2-semseg-rgb": (_nyuv2, ["model.head.embed_dim=64"]),
    "nyuv2-semseg-depth": (_nyuv2, ["model.head.embed_dim=64"]),
    "nyuv2-semseg-rgbd": (_nyuv2, ["model.head.embed_dim=64"]),
    "nyuv2-depth": (_nyuv2, ["model.head.hooks=null", "model.head.feature_dim=16"]),
    "ade20k-semseg": (_ade20k, ["model.head.embed_dim=64"]),
    "in1k-cls": (_imagenet, ["model.head.num_classes=2"]),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = {}
    for make in {_nyuv2, _ade20k, _imagenet}:
        root = tmp_path_factory.mktemp(make.__name__.strip("_"))
        make(root)
        out[make] = root
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_steps_of_multimae_finetune(name, datasets, tmp_path):
    make, extra = CONFIGS[name]
    rc = cli(["finetune", "--config", f"configs/finetune/{name}.yaml", f"data.root={datasets[make]}", TINY_ENC,
              *extra, "data.image_size=32", "data.num_workers=0", "train.batch_size=2", "train.eval_batch_size=2",
              "train.epochs=1", "train.precision=fp32", "train.log_every=1", f"train.out_dir={tmp_path}",
              "train.run_name=run"])
    assert rc == 0
    run = tmp_path / "run"
    res = json.loads((run / "eval.json").read_text())
    assert res["step"] == 2
    metric = {"in1k-cls": "top1", "nyuv2-depth": "delta1"}.get(name, "miou")
    assert np.isfinite(res["metrics"][metric])
    if name == "nyuv2-depth":
        assert res["num_samples"] == 2 and {"absrel", "rmse", "delta3"} <= set(res["metrics"])
        assert cli(["evaluate", "--checkpoint", str(run), "data.eval_split=train"]) == 0
        again = json.loads((run / "eval-train.json").read_text())
        assert again["split"] == "train" and again["num_samples"] == 4
