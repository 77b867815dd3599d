"""Folder datasets as users have them: only train/, NaN in float maps, a modality declared only
in the run config -- trained from the command line."""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from multimae.cli.main import main
from multimae.data import DataError
from multimae.data.folder import FolderDataset, holdout, write_folder
from multimae.data.synthetic import SyntheticScenes
from multimae.core.modalities import ModalitySpec
from tiny import TINY_OVERRIDES

CURVATURE = "{semseg: {num_classes: 6}, curvature: {kind: dense, channels: 2, loss: l1}}"
SMALL = TINY_OVERRIDES + [
         "data.source=folder", "data.cache=false", "mask.num_visible=8", "optim.lr=1e-3", "optim.warmup_steps=1",
         "train.batch_size=4", "train.max_steps=3", "train.log_every=1", "train.resume=null"]


def _train_only_folder(root: Path, n: int = 16, curvature: bool = False) -> Path:
    """rgb/depth/semseg under root/train only; with ``curvature``: a 2-channel float .npy per sample
    (one NaN and one inf each, as real sensor-derived maps have)."""
    write_folder(SyntheticScenes(n, image_size=32, seed=2, modalities=["rgb", "depth", "semseg"]), root, "train")
    if curvature:
        rng = np.random.default_rng(0)
        for f in sorted((root / "train" / "rgb" / "all").iterdir()):
            c = rng.normal(size=(2, 32, 32)).astype(np.float32)
            c[0, 1, 2], c[1, 3, 4] = np.nan, np.inf
            out = root / "train" / "curvature" / "all" / f"{f.stem}.npy"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, c)
    return root


def _pretrain(tmp_path: Path, root: Path, name: str, *extra: str) -> tuple[int, Path]:
    rc = main(["pretrain", "--config", "configs/pretrain/synthetic-tiny.yaml", *SMALL, f"data.root={root}",
               f"train.out_dir={tmp_path / 'runs'}", f"train.run_name={name}", *extra])
    return rc, tmp_path / "runs" / name


def test_train_only_folder_trains_and_skips_evaluation_with_one_notice(tmp_path, caplog, capsys):
    root = _train_only_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        rc, run = _pretrain(tmp_path, root, "plain", "data.num_workers=0")  # eval_at_end and figure: on
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["data/skipped"] == 0
    notices = [r.getMessage() for r in caplog.records if "no validation split" in r.getMessage()]
    assert len(notices) == 1 and "data.val_fraction" in notices[0] and "skipped" in notices[0]
    assert not (run / "eval.md").exists() and not (run / "reconstruction.png").exists()
    capsys.readouterr()
    assert main(["visualize", "--checkpoint", str(run)]) == 2  # held-out figure: nothing held out
    assert "no held-out samples" in capsys.readouterr().err


def test_holdout_is_fixed_by_the_sample_names():
    keys = [f"all/{i:05d}" for i in range(200)]
    train, held = holdout(keys, 0.1)
    assert len(held) == 20 and sorted(train + held) == list(range(200))
    shuffled = random.Random(1).sample(keys, len(keys))
    _, held2 = holdout(shuffled, 0.1)
    assert {shuffled[i] for i in held2} == {keys[i] for i in held}  # same samples whatever the order
    assert len(holdout(keys[:3], 0.01)[1]) == 1 and len(holdout(keys[:3], 0.9)[1]) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        holdout(keys, 1.0)


def test_config_only_modality_pretrains_from_the_cli(tmp_path, caplog):
    """curvature exists only in the run's overrides: the folder dataset reads curvature/ with the
    run's spec, its NaN/inf are invalid pixels (counted in metrics.jsonl), part of train/ is held
    out for the end-of-run evaluation, and the finished run loads with the public loader."""
    root = _train_only_folder(tmp_path / "data", curvature=True)
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        rc, run = _pretrain(tmp_path, root, "curv", "data.num_workers=1", "data.val_fraction=0.25",
                            f"model.modalities={CURVATURE}", "model.inputs=[rgb,curvature]",
                            "model.outputs=[rgb,depth,semseg,curvature]")
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and all(np.isfinite(r["loss/curvature"]) for r in rows)
    # 3 steps x 4 samples, 2 invalid values each (a DataLoader worker may have read ahead)
    assert rows[-1]["data/invalid_pixels"] >= 2 * 4 * 3
    assert any("holding out 4 of 16 samples" in r.getMessage() for r in caplog.records)
    assert "4 held-out samples" in (run / "eval.md").read_text()
    assert (run / "reconstruction.png").is_file()

    from multimae.model.multimae import MultiMAE

    model, _ = MultiMAE.from_pretrained(run, with_report=True)
    assert model.input_specs["curvature"] == ModalitySpec("curvature", "dense", channels=2, loss="l1")
    out = model({"rgb": torch.zeros(1, 3, 32, 32), "curvature": torch.zeros(1, 2, 32, 32)})
    assert out.preds["curvature"].shape == (1, 2, 32, 32) and out.preds["semseg"].shape == (1, 6, 8, 8)


def test_datasets_use_the_runs_specs(tmp_path):
    """Folder and shard datasets take the run's specs: a config-only modality is read, and semseg
    ids are checked against the run's class count, not the registry's 133."""
    from multimae.data.shards import ShardDataset, folder_samples, write_shards

    root = _train_only_folder(tmp_path / "data", n=4, curvature=True)
    semseg6 = ModalitySpec("semseg", "categorical", num_classes=6, stride=4, loss="ce")
    curvature = ModalitySpec("curvature", "dense", channels=2, loss="l1")
    run_specs = [ModalitySpec("rgb", "image", channels=3), semseg6, curvature]
    ds = FolderDataset(root, "train", run_specs)
    assert ds[0]["curvature"].shape == (2, 32, 32) and ds.policy.invalid_pixels == 2
    urls = write_shards(folder_samples(ds), str(tmp_path / "s-%06d.tar"), max_count=2)
    sample = next(iter(ShardDataset(urls, run_specs, shuffle_buffer=0)))
    assert sample["curvature"].shape == (2, 32, 32) and bool(torch.isfinite(sample["curvature"]).all())
    # and through the training loader of a shard source
    from multimae.data.config import DataConfig, MaskConfig
    from multimae.data.loader import BatchSpec, build_loader

    data = DataConfig(source="shards", urls=",".join(urls), num_samples=4, image_size=32, num_workers=0)
    spec = BatchSpec((run_specs[0], curvature), tuple(run_specs), 8, 32)
    loader, _ = build_loader(data, MaskConfig(num_visible=8), spec, seed=0, batch_size=2)
    batch, plan = next(iter(loader))
    assert batch["curvature"].shape == (2, 2, 32, 32) and batch["semseg"].shape == (2, 8, 8)
    assert set(plan.masks) == {"rgb", "curvature"}
    # class id 7 is valid for the registered semseg (133 classes) but not for this run's 6
    from PIL import Image

    f = root / "train" / "semseg" / "all" / "00000000.png"
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(f)
    with pytest.raises(DataError, match=r"class id 7 outside \[0, num_classes 6\)"):
        FolderDataset(root, "train", run_specs)[0]
