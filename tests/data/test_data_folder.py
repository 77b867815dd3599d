"""Folder datasets: official layout, labels, round trips, every bad-input case, the skip policy."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutils import official_folder, specs, write_png
from PIL import Image
from torch.utils.data import DataLoader

from multimae.data import DataError, collate
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.synthetic import LABEL_CLASSES, SyntheticScenes
from multimae.data.transforms import PairedTransform

THREE = ["rgb", "depth", "semseg"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_folder(SyntheticScenes(6, image_size=32, seed=4), root, "train", classes=LABEL_CLASSES)
    return root


def test_round_trip_from_synthetic(synth_root: Path) -> None:
    ds = FolderDataset(synth_root, "train", specs())
    src = SyntheticScenes(6, image_size=32, seed=4)
    assert len(ds) == 6 and ds.classes == LABEL_CLASSES
    for i in range(len(ds)):
        got = ds[i]
        ref = src[int(got["__key__"].split("/")[1])]
        assert torch.equal(got["rgb"], ref["rgb"]) and torch.equal(got["semseg"], ref["semseg"])
        assert (got["depth"] - ref["depth"]).abs().max() <= 0.0005 + 1e-6  # millimetre PNG
        assert (got["normals"] - ref["normals"]).abs().max() <= 1 / 127.5
        assert got["caption"] == ref["caption"] and int(got["label"]) == int(ref["label"])


def test_modalities_are_configuration(synth_root: Path) -> None:
    ds = FolderDataset(synth_root, "train", ["rgb"], label_from_class_dir=False)
    assert set(ds[0]) == {"rgb", "__key__"}
    ds = FolderDataset(synth_root, "train", ["norm_rgb", "label"], label_from_class_dir=False)
    assert set(ds[0]) == {"rgb", "label", "__key__"}
    t = PairedTransform(specs(THREE), 16)
    batch = collate([FolderDataset(synth_root, "train", specs(THREE), transform=t)[i] for i in range(2)])
    assert batch["rgb"].shape == (2, 3, 16, 16) and batch["semseg"].shape == (2, 4, 4)


def test_official_layout_16bit_depth(tmp_path: Path) -> None:
    official_folder(tmp_path, n=2)
    ds = FolderDataset(tmp_path, "train", specs(THREE))
    raw = np.array(Image.open(tmp_path / "train/depth/all/0000.png"))
    assert raw.dtype == np.uint16 and raw.max() > 255
    s = ds[0]
    assert "label" not in s and s["__key__"] == "all/0000"
    assert torch.equal((s["depth"][0].double() * 2**16).round().long(), torch.from_numpy(raw.astype(np.int64)))
    # class directories give labels by sorted name
    official_folder(tmp_path / "cls", n=1, cls="zebra")
    official_folder(tmp_path / "cls", n=1, cls="apple")
    ds = FolderDataset(tmp_path / "cls", "train", specs(THREE))
    assert ds.classes == ["apple", "zebra"] and [int(ds[i]["label"]) for i in range(2)] == [0, 1]


def test_npy_depth_and_16bit_semseg(tmp_path: Path) -> None:
    official_folder(tmp_path, n=1)
    (tmp_path / "train/depth/all/0000.png").unlink()
    np.save(tmp_path / "train/depth/all/0000.npy", np.full((16, 16), 2.5, np.float32))
    write_png(tmp_path / "train/semseg/all/0000.png", np.full((16, 16), 300, np.uint16))
    s = FolderDataset(tmp_path, "train", ["rgb", "depth", {"name": "semseg", "num_classes": 400}])[0]
    assert torch.all(s["depth"] == 2.5) and torch.all(s["semseg"] == 300)


# --- bad input ------------------------------------------------------------------------------------


def _one(tmp_path: Path) -> Path:
    return official_folder(tmp_path, n=3)


def _raises(root: Path, match: str, modalities: list | None = None) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        ds = FolderDataset(root, "train", modalities or specs(THREE))
        for i in range(len(ds)):
            ds[i]
    return info.value


def test_truncated_image(tmp_path: Path) -> None:
    f = _one(tmp_path) / "train/rgb/all/0001.png"
    f.write_bytes(f.read_bytes()[:60])
    _raises(tmp_path, rf"rgb file {f}: truncated or not an image")


def test_non_image_file(tmp_path: Path) -> None:
    f = _one(tmp_path) / "train/depth/all/0002.png"
    f.write_text("this is not a png")
    _raises(tmp_path, rf"depth file {f}: truncated or not an image")


def test_missing_modality_file(tmp_path: Path) -> None:
    f = _one(tmp_path) / "train/semseg/all/0001.png"
    f.unlink()
    _raises(tmp_path, rf"sample all/0001: missing semseg file {f.with_suffix('')}")


def test_different_sizes(tmp_path: Path) -> None:
    f = write_png(_one(tmp_path) / "train/depth/all/0000.png", np.ones((8, 8), np.uint16))
    err = _raises(tmp_path, r"sample all/0000 .*different sizes")
    assert str(f) in str(err) and "depth 8x8" in str(err) and "rgb 16x16" in str(err)


def test_class_id_out_of_range(tmp_path: Path) -> None:
    f = write_png(_one(tmp_path) / "train/semseg/all/0002.png", np.full((16, 16), 150, np.uint8))
    _raises(tmp_path, rf"semseg file {f}: class id 150 outside \[0, num_classes 6\)")


def test_non_finite_dense_values_are_invalid_pixels(tmp_path: Path) -> None:
    """NaN/inf in a float .npy depth (stereo disparity) are invalid pixels exactly like 0: set to
    0, left out of the standardisation statistics, counted -- in folders and in shards alike."""
    from multimae.data.shards import ShardDataset, folder_samples, write_shards
    from multimae.data.transforms import robust_standardize

    root = _one(tmp_path)
    (root / "train/depth/all/0000.png").unlink()
    depth = np.linspace(1.0, 5.0, 256, dtype=np.float32).reshape(16, 16)
    depth[3, 4], depth[5, 6], depth[7, 8] = np.nan, np.inf, -np.inf
    np.save(root / "train/depth/all/0000.npy", depth)
    ds = FolderDataset(root, "train", specs(THREE))
    s = ds[0]
    assert ds.policy.invalid_pixels == 3 and ds.skipped == 0
    assert bool(torch.isfinite(s["depth"]).all()) and float(s["depth"][0, 3, 4]) == 0.0
    zeroed = torch.from_numpy(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0))[None]
    assert torch.equal(s["depth"], zeroed)
    std = PairedTransform(specs(THREE), 16, train=False)(s)["depth"]
    valid = zeroed != 0
    assert torch.allclose(std, robust_standardize(zeroed, valid)) and float(std[0, 3, 4]) == 0.0
    vals = zeroed[valid].sort().values  # the statistics use the 253 finite values only
    kept = vals[int(0.1 * vals.numel()): int(0.9 * vals.numel())]
    assert torch.allclose(std[valid], (zeroed[valid] - kept.mean()) / torch.sqrt(kept.var() + 1e-6))
    # the same bytes streamed from a shard
    urls = write_shards(folder_samples(ds), str(tmp_path / "s-%06d.tar"), max_count=8)
    shards = ShardDataset(urls, specs(THREE), shuffle_buffer=0)
    got = {x["__key__"]: x for x in shards}
    assert torch.equal(got["all/0000"]["depth"], zeroed) and shards.policy.invalid_pixels == 3


def test_dense_map_without_valid_pixel(tmp_path: Path) -> None:
    root = _one(tmp_path)
    zero = write_png(root / "train/depth/all/0001.png", np.zeros((16, 16), np.uint16))
    with pytest.raises(DataError, match=rf"depth file {zero}: no valid pixel"):
        FolderDataset(root, "train", specs(THREE))[1]
    (root / "train/depth/all/0002.png").unlink()
    nan = root / "train/depth/all/0002.npy"
    np.save(nan, np.full((16, 16), np.nan, np.float32))
    with pytest.raises(DataError, match=rf"depth file {nan}: no valid pixel"):
        FolderDataset(root, "train", specs(THREE))[2]
    skipping = FolderDataset(root, "train", specs(THREE), on_error="skip")
    assert [skipping[i]["__key__"] for i in range(3)] == ["all/0000", "all/0000", "all/0000"]
    assert skipping.skipped == 3  # item 1 passes over 0001 and 0002, item 2 over 0002: every skip counted


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    for m in THREE:
        (tmp_path / "train" / m / "all").mkdir(parents=True)
    _raises(tmp_path, r"rgb: empty")
    with pytest.raises(DataError, match=r"val: split directory not found"):
        FolderDataset(tmp_path, "val", THREE)
    (tmp_path / "train" / "rgb").rename(tmp_path / "train" / "rgb_old")
    _raises(tmp_path, r"train/rgb: modality directory not found")


# --- skip policy ----------------------------------------------------------------------------------


def test_skip_policy_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = official_folder(tmp_path, n=6)
    trunc = root / "train/rgb/all/0001.png"
    trunc.write_bytes(trunc.read_bytes()[:50])
    classes = write_png(root / "train/semseg/all/0003.png", np.full((16, 16), 99, np.uint8))
    missing = root / "train/depth/all/0005.png"
    missing.unlink()
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        ds = FolderDataset(root, "train", specs(THREE), on_error="skip")
        assert len(ds) == 5 and ds.skipped == 1  # the missing file, found while indexing
        keys = [ds[i]["__key__"] for i in range(len(ds))]
    assert ds.skipped == 3
    assert "all/0001" not in keys and "all/0003" not in keys
    text = caplog.text
    assert str(trunc) in text and str(classes) in text and "0005" in text


def test_skip_count_across_workers(tmp_path: Path) -> None:
    root = official_folder(tmp_path, n=8)
    for i in (1, 4, 6):
        write_png(root / f"train/semseg/all/{i:04d}.png", np.full((16, 16), 77, np.uint8))
    ds = FolderDataset(root, "train", specs(THREE), on_error="skip")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    n = sum(len(b["__key__"]) for b in loader)
    assert n == 8 and ds.skipped == 3
