"""The fast data path (``packed=True`` datasets + ``PairedTransform(fast=True)``) against the
reference path (``decode_field`` tensors + ``PairedTransform(fast=False)``).

Documented tolerance: semseg bit for bit; rgb (after normalisation) within 1e-6 (the fast path
normalises with one fused multiply-add, the same resized uint8 pixels); depth (robust-
standardised) within 1e-5 of max(1, |reference value|) on these maps and within 1e-6 of the reference
algorithm computed in float64 (the fast path computes in float64; the float32 reference itself is up to
~1e-4 from that on low-contrast crops, 8.7e-5 on the benchmark's synthetic scenes) -- absolute for the usual |z| <= 1-5, as its
robust statistics are summed in another order. Crop boxes,
flips and per-sample seeding are the reference's, so resumed runs see the same samples.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutils import specs as synthetic_specs
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from multimae.core import modalities
from multimae.data import codecs
from multimae.data.codecs import Packed, decode_field, decode_packed
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.errors import DataError
from multimae.data.folder import FolderDataset
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, folder_samples, write_shards
from multimae.data.transforms import (
    PairedTransform, nearest_exact_index, robust_standardize, robust_standardize_fast, trimmed_moments,
)

DEPTH_TOL = 1e-5
RGB_TOL = 1e-6


def _rgb_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= RGB_TOL


def _depth_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to max(1, |reference value|): absolute for standardised depth."""
    return float(((a - b).abs() / a.abs().clamp_min(1.0)).max())

SPECS = modalities.resolve(["rgb", "depth", {"name": "semseg", "num_classes": 300}])


def _jpeg(arr: np.ndarray, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.convert("P")  # palette indices = the values (a greyscale palette)
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Samples of several sizes and encodings: JPEG 4:4:4 / 4:2:0 and PNG rgb; 16-bit depth with
    and without invalid (0) pixels, 8-bit depth; 8-bit, 16-bit and palette semseg."""
    root = tmp_path_factory.mktemp("fast")
    rng = np.random.default_rng(0)
    sizes = [(48, 64), (64, 48), (57, 57), (100, 75), (32, 40), (256, 256)]
    for i, (h, w) in enumerate(sizes * 2):
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        rgb_bytes = _jpeg(rgb, 2) if i % 3 == 0 else _jpeg(rgb, 0) if i % 3 == 1 else _png(rgb)
        _write(root / "train" / "rgb" / "all" / f"{i:03d}.{'png' if i % 3 == 2 else 'jpg'}", rgb_bytes)
        depth = (1000 + 30 * xx + 7 * yy + rng.integers(0, 50, (h, w))).astype(np.uint16)
        if i % 2:
            depth[rng.random((h, w)) < 0.3] = 0  # holes: the masked interpolation
        if i == 5:
            depth = (depth // 300).astype(np.uint8)  # an 8-bit depth map
        _write(root / "train" / "depth" / "all" / f"{i:03d}.png", _png(depth))
        sem = ((xx // 7 + yy // 5) % 40).astype(np.uint8)
        sem_bytes = _png(sem.astype(np.uint16) * 7) if i % 4 == 1 else _png(sem, "P") if i % 4 == 2 else _png(sem)
        _write(root / "train" / "semseg" / "all" / f"{i:03d}.png", sem_bytes)
    return root


def _compare(a: dict, b: dict) -> None:
    assert a["__key__"] == b["__key__"]
    assert _rgb_close(a["rgb"], b["rgb"]), a["__key__"]
    assert a["rgb"].dtype == b["rgb"].dtype == torch.float32
    assert torch.equal(a["semseg"], b["semseg"]), a["__key__"]
    assert a["semseg"].dtype == b["semseg"].dtype == torch.int64
    assert a["depth"].shape == b["depth"].shape
    assert _depth_err(a["depth"], b["depth"]) <= DEPTH_TOL, a["__key__"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kw", [dict(train=True), dict(train=True, hflip=1.0), dict(train=False),
                                dict(train=False, eval_crop_pct=0.875), dict(train=True, train_crop="shorter_side"),
                                dict(train=True, scale=(0.02, 0.05))])
def test_fast_path_matches_reference(folder: Path, kw: dict) -> None:
    for size in (32, 224):
        ref = FolderDataset(folder, "train", SPECS, transform=PairedTransform(SPECS, size, seed=3, **kw))
        fast = FolderDataset(folder, "train", SPECS, transform=PairedTransform(SPECS, size, seed=3, fast=True, **kw),
                             packed=True)
        for epoch in range(3):
            ref.transform.set_epoch(epoch)
            fast.transform.set_epoch(epoch)
            for i in range(len(ref)):
                _compare(ref[i], fast[i])


def _depth_oracle(raw: np.ndarray, scale: float, box: tuple, size: int, flip: bool, trunc: float = 0.1) -> torch.Tensor:
    """The reference depth algorithm (masked antialiased resize, flip, truncated standardisation)
    in float64, on the pixels the reference keeps (its float32 ``den >= 0.5``)."""
    x = torch.from_numpy(raw.astype(np.float64) * scale)[None]
    kw = dict(interpolation=InterpolationMode.BILINEAR, antialias=True)
    valid = x != 0
    num = TF.resized_crop(torch.where(valid, x, 0.0), *box, [size, size], **kw)
    if bool(valid.all()):
        y, ok = num, torch.ones_like(num, dtype=torch.bool)
    else:
        ok = TF.resized_crop(valid.float(), *box, [size, size], **kw) >= 0.5
        y = num / TF.resized_crop(valid.double(), *box, [size, size], **kw).clamp_min(1e-6)
    if flip:
        y, ok = y.flip(-1), ok.flip(-1)
    s = y[ok].sort().values
    n = s.numel()
    kept = s[int(trunc * n): int((1 - trunc) * n)] if int((1 - trunc) * n) - int(trunc * n) >= 2 else s
    z = (y - kept.mean()) / torch.sqrt(kept.var() + 1e-6)
    return torch.where(ok, z, 0.0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_depth_is_the_float64_computation(folder: Path) -> None:
    """The fast depth path computes in float64 (resize, statistics): within 1e-6 of the reference
    algorithm done in float64; the reference (float32) is within DEPTH_TOL of it, at the official
    16-bit PNG scale (where the variance is near the 1e-6 added to it) and at millimetres."""
    spec = SPECS[1]
    fast_err = ref_err = 0.0
    for path, scale in ((p, sc) for p in sorted((folder / "train" / "depth" / "all").glob("*.png"))
                        for sc in (2.0**-16, 1e-3)):  # the official scale (the 1e-6 of the variance matters), mm
        data = path.read_bytes()
        packed, ref = decode_packed(data, "png", spec, scale, str(path)), decode_field(data, "png", spec, scale, str(path))
        for size in (32, 224):
            tf, ft = PairedTransform(SPECS, size, seed=3), PairedTransform(SPECS, size, seed=3, fast=True)
            for t in range(6):
                box, flip = tf.params(*ref.shape[-2:], torch.Generator().manual_seed(t))
                want = _depth_oracle(packed.array, scale, box, size, flip)
                fast_err = max(fast_err, _depth_err(want, ft._apply_packed(packed, spec, box, flip).double()))
                ref_err = max(ref_err, _depth_err(want, tf._apply(ref, spec, box, flip, "x").double()))
    assert fast_err <= 1e-6 and ref_err <= DEPTH_TOL, (fast_err, ref_err)
    print(f"max error vs float64: fast {fast_err:.3g}, reference {ref_err:.3g}")


def test_fast_depth_on_a_low_contrast_crop_is_closer_to_float64_than_the_reference() -> None:
    """A flat far wall (mean / std ~ 500): the float32 reference's rounding shows in the standardised
    values (> 1e-5); the fast path stays within 1e-6 of the float64 computation."""
    spec = SPECS[1]
    yy, xx = np.mgrid[0:96, 0:96]
    raw = (6000 + xx // 8 + np.random.default_rng(1).integers(0, 8, (96, 96))).astype(np.uint16)
    raw[:3, :3] = 0  # a few holes: the masked resize
    packed = Packed("dense", raw, 1e-3)
    tf, ft = PairedTransform(SPECS, 64, seed=0), PairedTransform(SPECS, 64, seed=0, fast=True)
    fast_err = ref_err = 0.0
    for t in range(8):
        box, flip = tf.params(96, 96, torch.Generator().manual_seed(t))
        want = _depth_oracle(raw, 1e-3, box, 64, flip)
        fast_err = max(fast_err, _depth_err(want, ft._apply_packed(packed, spec, box, flip).double()))
        ref_err = max(ref_err, _depth_err(want, tf._apply(packed.tensor(), spec, box, flip, "x").double()))
    assert fast_err <= 1e-6 < DEPTH_TOL < ref_err, (fast_err, ref_err)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_packed_fields_decode_to_the_reference_tensors(folder: Path) -> None:
    ds = FolderDataset(folder, "train", SPECS, packed=True)
    kinds = set()
    for i in range(len(ds)):
        for key, path in ds.files(i).items():
            data, ext, spec = path.read_bytes(), path.suffix[1:], ds.specs[key]
            packed = decode_packed(data, ext, spec, ds.png_scale[key], str(path))
            ref = decode_field(data, ext, spec, ds.png_scale[key], str(path))
            assert isinstance(packed, Packed)
            kinds.add((key, packed.array.dtype.str))
            assert packed.shape == tuple(ref.shape)
            assert packed.tensor().dtype == ref.dtype and torch.equal(packed.tensor(), ref), path
    assert {("depth", "<u2"), ("depth", "|u1"), ("semseg", "<u2"), ("semseg", "|u1"), ("rgb", "|u1")} <= kinds


def test_reference_transform_reads_packed_samples_bit_for_bit(folder: Path) -> None:
    """fast=False on a packed dataset decodes the packed fields first: the reference output."""
    ref = FolderDataset(folder, "train", SPECS, transform=PairedTransform(SPECS, 32, seed=1))
    packed = FolderDataset(folder, "train", SPECS, transform=PairedTransform(SPECS, 32, seed=1), packed=True)
    for i in range(len(ref)):
        a, b = ref[i], packed[i]
        assert all(torch.equal(a[k], b[k]) for k in ("rgb", "depth", "semseg"))


@pytest.mark.parametrize("out", [7, 56, 224])
def test_nearest_index_is_torch_nearest_exact(out: int) -> None:
    for n in range(1, 520):
        src = torch.arange(n, dtype=torch.int64)[None, None].expand(1, 2, n)
        want = TF.resize(src, [2, out], interpolation=InterpolationMode.NEAREST_EXACT)[0, 0].numpy()
        assert np.array_equal(nearest_exact_index(n, out), want), n


def test_resize64_is_the_antialiased_resize() -> None:
    """The plain bilinear kernel where no axis shrinks equals the antialiased one (float64)."""
    from multimae.data.transforms import _resize64

    g = torch.Generator().manual_seed(0)
    for h, w, size in [(114, 130, 224), (224, 100, 224), (37, 224, 224), (250, 90, 224), (300, 300, 224),
                       (1, 5, 32), (32, 32, 32), (20, 40, 32)]:
        x = torch.rand(1, h, w, generator=g, dtype=torch.float64) * 1000
        want = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        assert float((_resize64(x, size) - want).abs().max()) <= 1e-9, (h, w, size)


def test_robust_standardize_fast_within_tolerance() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [torch.rand(1, 64, 64, generator=g) * 10 + 0.5,
             torch.randint(1, 5, (1, 50, 70), generator=g).float(),  # many ties at the cut ranks
             torch.rand(1, 224, 224, generator=g) * 80.0,
             torch.tensor([[[2.0, 3.0]]]), torch.tensor([[[5.0]]]), torch.zeros(1, 4, 4)]
    holes = torch.rand(1, 64, 64, generator=g) * 3
    holes[torch.rand(1, 64, 64, generator=g) < 0.4] = 0
    cases.append(holes)
    for x in cases:
        for trunc in (0.0, 0.1, 0.25, 0.49):
            a, b = robust_standardize(x, trunc=trunc), robust_standardize_fast(x, trunc=trunc)
            assert _depth_err(a, b) <= DEPTH_TOL, (x.shape, trunc)
    x = cases[2]
    assert torch.equal(robust_standardize_fast(x, torch.ones_like(x, dtype=torch.bool)),
                       robust_standardize_fast(x, None, all_valid=True))


def test_trimmed_moments_are_the_sorted_slice_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact selection without a sort: the mean and variance of ``sort(v)[lo:hi]`` (float64), on
    smooth maps, noise, heavy ties (a plateau: the partition fallback), outliers and small arrays."""
    from multimae.data import transforms

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:224, 0:224]
    plateau = np.full(224 * 224, 3.0, np.float32)
    plateau[:4000] = rng.random(4000)
    outliers = (5 + rng.standard_normal(224 * 224)).astype(np.float32)
    outliers[rng.random(outliers.size) < 0.05] = 65.535
    cases = [(3 + 0.02 * xx + 0.005 * yy + 0.03 * rng.random((224, 224))).astype(np.float32).ravel(),
             rng.random(60000).astype(np.float32), rng.integers(1, 6, 50000).astype(np.float32), plateau, outliers,
             rng.random(300).astype(np.float32), np.float32([2.0, 3.0, 7.0])]
    fallbacks = []
    partition = transforms.trimmed_moments_partition
    monkeypatch.setattr(transforms, "trimmed_moments_partition", lambda *a: fallbacks.append(1) or partition(*a))
    for v in cases:
        n = v.size
        for trunc in (0.0, 0.1, 0.25, 0.49):
            lo, hi = int(trunc * n), int((1 - trunc) * n)
            lo, hi = (lo, hi) if hi - lo >= 2 else (0, n)  # as robust_standardize_fast
            kept = np.sort(v)[lo:hi].astype(np.float64)
            mean, var = trimmed_moments(v, lo, hi)
            assert abs(mean - kept.mean()) <= 1e-12 * max(1.0, abs(kept.mean())), (n, trunc)
            want = kept.var(ddof=1) if kept.size > 1 else 0.0
            assert abs(var - want) <= 1e-9 * max(want, 1e-12) + 1e-12, (n, trunc)
    assert 8 < len(fallbacks) < 28, len(fallbacks)  # small arrays and some ties took the partition, not all
    with pytest.raises(ValueError):
        trimmed_moments(cases[0], 10, 10)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_path_is_deterministic_per_sample_and_epoch(folder: Path) -> None:
    tf = PairedTransform(SPECS, 32, seed=11, fast=True)
    ds = FolderDataset(folder, "train", SPECS, transform=tf, packed=True)
    first = [ds[i] for i in range(len(ds))]
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    for i in range(len(ds)):
        again, other = ds[len(ds) - 1 - i], copy[i]  # any order, any process: the same sample
        for k in ("rgb", "depth", "semseg"):
            assert torch.equal(first[len(ds) - 1 - i][k], again[k]) and torch.equal(first[i][k], other[k])
    tf.set_epoch(1)
    assert any(not torch.equal(first[i]["rgb"], ds[i]["rgb"]) for i in range(len(ds)))


def _bad_folder(root: Path, semseg: np.ndarray, depth: np.ndarray) -> Path:
    rgb = np.zeros((16, 16, 3), np.uint8)
    _write(root / "train" / "rgb" / "all" / "a.png", _png(rgb))
    _write(root / "train" / "depth" / "all" / "a.png", _png(depth))
    _write(root / "train" / "semseg" / "all" / "a.png", _png(semseg))
    return root


@pytest.mark.parametrize("case", ["class", "depth", "size"])
def test_packed_validation_gives_the_reference_errors(tmp_path: Path, case: str) -> None:
    sem = np.zeros((16, 16), np.uint8)
    depth = np.full((16, 16), 500, np.uint16)
    if case == "class":
        sem[3, 4] = 9
    elif case == "depth":
        depth[:] = 0
    else:
        sem = np.zeros((16, 12), np.uint8)
    root = _bad_folder(tmp_path, sem, depth)
    specs = modalities.resolve(["rgb", "depth", {"name": "semseg", "num_classes": 6}])
    errors = []
    for packed in (False, True):
        with pytest.raises(DataError) as err:
            FolderDataset(root, "train", specs, packed=packed).load(0)
        errors.append(str(err.value))
    assert errors[0] == errors[1]
    assert {"class": "class id 9", "depth": "no valid pixel", "size": "different sizes"}[case] in errors[1]


def test_packed_ignore_index_passes_like_the_reference(tmp_path: Path) -> None:
    sem = np.zeros((16, 16), np.uint8)
    sem[0, :3] = 255
    root = _bad_folder(tmp_path, sem, np.full((16, 16), 500, np.uint16))
    specs = modalities.resolve(["rgb", "depth", {"name": "semseg", "num_classes": 6, "ignore_index": 255}])
    a = FolderDataset(root, "train", specs, transform=PairedTransform(specs, 16, seed=0))[0]
    b = FolderDataset(root, "train", specs, transform=PairedTransform(specs, 16, seed=0, fast=True), packed=True)[0]
    assert torch.equal(a["semseg"], b["semseg"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shards_fast_path_matches_reference(folder: Path, tmp_path: Path) -> None:
    src = FolderDataset(folder, "train", SPECS)
    urls = write_shards(folder_samples(src), str(tmp_path / "s-%04d.tar"), 5)
    ref = ShardDataset(urls, SPECS, transform=PairedTransform(SPECS, 32, seed=2), shuffle_buffer=4)
    fast = ShardDataset(urls, SPECS, transform=PairedTransform(SPECS, 32, seed=2, fast=True), shuffle_buffer=4,
                        packed=True)
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        fast.set_epoch(epoch)
        pairs = list(zip(ref, fast))
        assert len(pairs) == len(src)
        for a, b in pairs:
            _compare(a, b)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_loader_fast_decode_gives_the_reference_batches(tmp_path: Path, source: str) -> None:
    """build_loader with data.fast_decode (the default) vs the reference: the same samples in the
    same batches with the same MaskPlans; rgb / semseg bit for bit, depth within tolerance."""
    specs = synthetic_specs(["rgb", "depth", "semseg"])
    from multimae.data.folder import write_folder
    from multimae.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(16, image_size=40, seed=4, modalities=["rgb", "depth", "semseg"])
    write_folder(scenes, tmp_path, "train", image_format="jpg")
    urls = ",".join(write_shards(scenes, str(tmp_path / "s-%04d.tar"), 4))
    spec = BatchSpec(tuple(specs), tuple(specs), patch_size=8, image_size=32)
    out = {}
    for fast in (False, True):
        data = DataConfig(source=source, root=str(tmp_path), urls=urls, num_samples=16, num_workers=0,
                          shuffle_buffer=4, fast_decode=fast)
        loader, position = build_loader(data, MaskConfig(num_visible=12), spec, seed=5, batch_size=4)
        out[fast] = []
        for epoch in (0, 1):
            position.set_epoch(epoch)
            out[fast] += list(loader)
    assert len(out[True]) == len(out[False]) == 8
    for (a, pa), (b, pb) in zip(out[False], out[True]):
        assert a.extra["__key__"] == b.extra["__key__"]
        assert _rgb_close(a["rgb"], b["rgb"]) and torch.equal(a["semseg"], b["semseg"])
        assert _depth_err(a["depth"], b["depth"]) <= DEPTH_TOL
        assert all(torch.equal(pa.masks[n], pb.masks[n]) for n in pa.masks)


def test_packed_falls_back_for_other_encodings(tmp_path: Path) -> None:
    """.npy maps and multi-channel dense PNGs (normals) are decoded as the reference does."""
    spec = modalities.resolve(["normals"])[0]
    normals = np.full((8, 8, 3), 128, np.uint8)
    got = decode_packed(_png(normals), "png", spec, 1.0, "n.png")
    assert torch.is_tensor(got) and torch.equal(got, decode_field(_png(normals), "png", spec, 1.0, "n.png"))
    buf = io.BytesIO()
    np.save(buf, np.ones((1, 8, 8), np.float32))
    depth = modalities.resolve(["depth"])[0]
    assert torch.is_tensor(decode_packed(buf.getvalue(), "npy", depth, 1.0, "d.npy"))
    assert codecs.Packed("categorical", np.zeros((3, 4), np.uint8)).shape == (3, 4)


# --- pre-resized shards (multimae data shards --resize) -------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shards_cli_resize_stores_the_shorter_side(folder: Path, tmp_path: Path) -> None:
    from multimae.cli.main import main

    pattern = str(tmp_path / "r-%04d.tar")
    assert main(["data", "shards", "--folder", str(folder), "--modalities", "rgb,depth,semseg", "--num-classes",
                 "300", "--out", pattern, "--resize", "40"]) == 0
    urls = sorted(str(p) for p in tmp_path.glob("r-*.tar"))
    src = FolderDataset(folder, "train", SPECS)
    small = {s["__key__"]: s for s in ShardDataset(urls, SPECS, shuffle_buffer=0)}
    assert len(small) == len(src)
    for i in range(len(src)):
        full = src.load(i)
        got = small[full["__key__"]]
        h, w = full["rgb"].shape[-2:]
        if min(h, w) <= 40:  # never enlarged: stored as it was
            assert all(torch.equal(full[k], got[k]) for k in ("rgb", "depth", "semseg"))
            continue
        assert min(got["rgb"].shape[-2:]) == 40 and got["rgb"].shape[-2:] == got["depth"].shape[-2:] \
            == got["semseg"].shape[-2:]
        want = TF.resize(full["rgb"], [40], interpolation=InterpolationMode.BILINEAR, antialias=True)
        err = (got["rgb"].float() - want.float()).abs().mean((1, 2))
        assert float(err[:2].max()) < 3.0 and float(err[2]) < 8.0, err  # JPEG q95 re-encoding (channel 2: noise)
        assert set(got["semseg"].unique().tolist()) <= set(full["semseg"].unique().tolist())
        d, valid = got["depth"], got["depth"] > 0
        assert bool(valid.any()) and float(d[valid].min()) >= float(full["depth"][full["depth"] > 0].min()) - 1e-3
        assert float(d.max()) <= float(full["depth"].max()) + 1e-3
    assert main(["data", "shards", "--folder", str(folder), "--out", pattern, "--resize", "0"]) == 2
