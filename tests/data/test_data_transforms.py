"""Paired transforms: golden standardisation, registration across modalities, flips, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from data_testutils import specs
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from multimae.data import DataError, collate
from multimae.data.synthetic import SyntheticScenes
from multimae.data.transforms import PairedTransform, random_resized_crop_box, robust_standardize

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "multimae-official-compact.safetensors"


def test_robust_standardize_matches_official_golden() -> None:
    t = load_file(GOLDEN)
    raw, expected = t["input.depth_raw"], t["input.depth"]
    for b in range(raw.shape[0]):
        torch.testing.assert_close(robust_standardize(raw[b]), expected[b], atol=1e-5, rtol=0)


def test_robust_standardize_ignores_invalid_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(1, 20, 20, generator=g) * 5 + 1
    bad = torch.zeros(1, 20, 20, dtype=torch.bool)
    bad[0, :4], bad[0, :, :3] = True, True
    noisy = depth.clone()
    noisy[0, :4] = 0.0
    noisy[0, :2, :3] = float("nan")
    noisy[0, 2:, :3] = float("inf")
    out = robust_standardize(noisy)
    assert torch.isfinite(out).all() and (out[bad] == 0).all()
    vals = depth[~bad].sort().values
    n = vals.numel()
    kept = vals[int(0.1 * n): int(0.9 * n)]
    ref = (depth - kept.mean()) / torch.sqrt(kept.var() + 1e-6)
    torch.testing.assert_close(out[~bad], ref[~bad])
    assert torch.equal(robust_standardize(torch.zeros(1, 4, 4)), torch.zeros(1, 4, 4))
    assert torch.isfinite(robust_standardize(torch.tensor([[0.0, 2.0, 0.0]]))).all()


def test_crop_box_distribution() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 80, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.2 * 0.9 <= h * w / (60 * 80) <= 1.0 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def _nearest_reference(x: torch.Tensor, box: tuple[int, int, int, int], out: int, flip: bool) -> torch.Tensor:
    """Nearest sampling at pixel centres of ``box``, written independently of torchvision."""
    top, left, h, w = box
    rows = [top + math.floor((a + 0.5) * h / out) for a in range(out)]
    cols = [left + math.floor((b + 0.5) * w / out) for b in range(out)]
    y = x[rows][:, cols]
    return y.flip(-1) if flip else y


@pytest.mark.parametrize("seed", range(6))
def test_semseg_crop_equals_independent_nearest_crop(seed: int) -> None:
    raw = SyntheticScenes(4, image_size=64, seed=2)[seed % 4]
    t = PairedTransform(specs(["rgb", "depth", "semseg"]), 32)
    box, flip = t.params(64, 64, torch.Generator().manual_seed(seed))
    out = t(raw, generator=torch.Generator().manual_seed(seed))
    assert out["semseg"].shape == (8, 8) and out["semseg"].dtype == torch.int64
    assert torch.equal(out["semseg"], _nearest_reference(raw["semseg"], box, 8, flip))


def _coded_sample(raw: dict) -> dict:
    """A sample whose depth and rgb are functions of its segmentation, so registration is checkable."""
    sem = raw["semseg"]
    palette = torch.tensor([[10, 200, 30], [240, 10, 90], [0, 0, 255], [128, 128, 0], [60, 30, 200], [250, 250, 250]])
    return {"rgb": palette[sem].permute(2, 0, 1).to(torch.uint8), "depth": (sem.float() + 1)[None], "semseg": sem,
            "__key__": raw["__key__"]}


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_rgb_depth_semseg_stay_registered(hflip: float) -> None:
    names = ["rgb", "depth", "semseg"]
    sp = [s.with_(standardize="none") if s.name == "depth" else s.with_(mean=None, std=None) if s.name == "rgb" else s
          for s in specs(names)]
    t = PairedTransform(sp, 48, hflip=hflip)
    checked = 0
    for i in range(4):
        sample = _coded_sample(SyntheticScenes(4, image_size=64, seed=8)[i])
        out = t(sample, generator=torch.Generator().manual_seed(i))
        depth, sem = out["depth"][0], out["semseg"]
        # the 2x2 full-resolution pixels at the centre of each 4x4 semseg cell
        centre = torch.stack([depth[1::4, 1::4], depth[1::4, 2::4], depth[2::4, 1::4], depth[2::4, 2::4]])
        interior = (centre - centre.round()).abs().amax(0) < 1e-4
        interior &= (centre.amax(0) - centre.amin(0)) < 1e-4
        assert interior.float().mean() > 0.5
        assert torch.equal(sem[interior], centre[0][interior].round().long() - 1)
        palette = torch.tensor([[10, 200, 30], [240, 10, 90], [0, 0, 255], [128, 128, 0], [60, 30, 200],
                                [250, 250, 250]]).float() / 255
        rgb_at = out["rgb"][:, 1::4, 1::4].permute(1, 2, 0)[interior]
        torch.testing.assert_close(rgb_at, palette[sem[interior]], atol=2 / 255, rtol=0)
        checked += int(interior.sum())
    assert checked > 50


def test_flip_negates_normal_x() -> None:
    raw = SyntheticScenes(1, image_size=32, seed=0)[0]
    t = PairedTransform(specs(["normals", "semseg"]), 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    out = t(raw)
    expected = raw["normals"].flip(-1)
    expected[0] = -expected[0]
    torch.testing.assert_close(out["normals"], expected, atol=1e-5, rtol=0)
    no_flip = PairedTransform(specs(["normals", "semseg"]), 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(raw)
    torch.testing.assert_close(no_flip["normals"], raw["normals"], atol=1e-5, rtol=0)


def test_eval_is_center_crop_without_flip() -> None:
    raw = SyntheticScenes(1, image_size=(48, 64), seed=0)[0]
    t = PairedTransform(specs(["rgb", "semseg"]), 32, train=False)
    a, b = t(raw), t(raw, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["rgb"], b["rgb"])
    assert torch.equal(a["semseg"], _nearest_reference(raw["semseg"], (0, 8, 48, 48), 8, False))


def test_output_contract_and_dtypes() -> None:
    raw = SyntheticScenes(1, image_size=64, seed=0)[0]
    t = PairedTransform(specs(["rgb", "norm_rgb", "depth", "semseg", "normals", "caption"]), 32, seed=0)
    out = t(raw)
    assert set(out) == {"rgb", "depth", "semseg", "normals", "caption", "label", "__key__"}
    assert out["rgb"].shape == (3, 32, 32) and out["rgb"].dtype == torch.float32
    assert out["depth"].shape == (1, 32, 32) and out["normals"].shape == (3, 32, 32)
    assert out["semseg"].shape == (8, 8) and out["caption"] == raw["caption"]
    # truncated standardisation: the values between the 10% and 90% quantiles have mean 0, std 1
    d = out["depth"].flatten().sort().values
    mid = d[int(0.1 * d.numel()): int(0.9 * d.numel())]
    assert abs(float(mid.mean())) < 1e-4 and abs(float(mid.std()) - 1) < 1e-3
    batch = collate([out, t(SyntheticScenes(2, image_size=64, seed=0)[1])])
    assert batch["rgb"].shape == (2, 3, 32, 32) and batch["label"].shape == (2,)
    assert isinstance(batch["caption"], list) and isinstance(batch["__key__"], list)


def test_per_sample_seed_and_epoch() -> None:
    raw = SyntheticScenes(1, image_size=64, seed=0)[0]
    t = PairedTransform(specs(["rgb", "semseg"]), 32, seed=3)
    a, b = t(raw), t(raw)
    assert torch.equal(a["rgb"], b["rgb"])  # a function of (seed, epoch, key), not of call order
    t.set_epoch(1)
    assert not torch.equal(t(raw)["rgb"], a["rgb"])


def test_default_stream_differs_per_worker_and_epoch() -> None:
    t = PairedTransform(specs(["rgb", "semseg"]), 16)  # seed=None: seeded per process
    ds = SyntheticScenes(4, image_size=32, seed=0, modalities=["rgb", "semseg"], transform=t)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = [torch.stack([s["rgb"] for s in loader]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])
    torch.manual_seed(0)
    a = PairedTransform(specs(["rgb", "semseg"]), 16)(ds.__class__(1, 32)[0])
    torch.manual_seed(0)
    b = PairedTransform(specs(["rgb", "semseg"]), 16)(ds.__class__(1, 32)[0])
    assert torch.equal(a["rgb"], b["rgb"])  # reproducible in the main process from torch's seed


def test_invalid_depth_stays_zero_after_transform() -> None:
    raw = SyntheticScenes(1, image_size=64, seed=0)[0]
    raw["depth"][:, :, :32] = 0.0  # left half invalid
    t = PairedTransform(specs(["depth", "semseg"]), 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = t(raw)["depth"][0]
    assert (out[:, :15] == 0).all() and (out[:, 17:] != 0).float().mean() > 0.95
    assert torch.isfinite(out).all()


def test_errors_name_the_sample() -> None:
    raw = SyntheticScenes(1, image_size=32, seed=0)[0]
    t = PairedTransform(specs(["rgb", "depth", "semseg"]), 16)
    bad = dict(raw, depth=raw["depth"][:, :16])
    with pytest.raises(DataError, match=r"sample 00000000: modalities have different sizes"):
        t(bad)
    with pytest.raises(DataError, match=r"sample 00000000: missing modality 'depth'"):
        t({k: v for k, v in raw.items() if k != "depth"})
    with pytest.raises(ValueError, match="divisible"):
        PairedTransform(specs(["semseg"]), 18)
