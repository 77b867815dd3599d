"""Tiled prediction of rasters larger than memory (multimae.apps.tiled, ``multimae predict --tiled``):
outputs equal an in-memory blend of the same windows (and the untiled ``Predictor`` where one window
covers the raster), every TIFF layout reads the same, georeferencing tags are copied, bad files give one
clear error, and peak memory - measured in a subprocess - stays under the declared bound on a raster
whose pixels are ~20x that bound."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from multimae.apps.tiled import TiffWindows, memory_bound, predict_tiled
from multimae.data.errors import DataError
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[3]
GEO = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
       (34735, "H", 8, (1, 1, 0, 1, 1024, 0, 1, 1), True), (34737, "s", 0, "WGS 84|", True)]


def _image(H, W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _reference(run_fn, img, window, overlap):
    """An independent in-memory blend: every window over the whole (C,H,W) image (predictions resized
    to the window bilinearly), weights the outer product of a linear ramp over ``overlap`` pixels,
    divided by their sum."""
    C, H, W = img.shape
    stride = window - overlap

    def starts(n):
        if n <= window:
            return [0]
        s = list(range(0, n - window + 1, stride))
        return s if s[-1] == n - window else s + [n - window]

    i = np.arange(window) + 0.5
    w = np.minimum(1.0, np.minimum(i, window - i) / overlap) if overlap else np.ones(window)
    acc, wsum = {}, np.zeros((H, W))
    for y0 in starts(H):
        for x0 in starts(W):
            win = img[None, :, y0:y0 + window, x0:x0 + window]
            for t, p in run_fn({"rgb": torch.from_numpy(np.ascontiguousarray(win))}).items():
                if p.shape[-2:] != (window, window):  # as documented: resized to the window
                    p = torch.nn.functional.interpolate(p, size=(window, window), mode="bilinear", align_corners=False)
                acc.setdefault(t, np.zeros((p.shape[1], H, W)))
                acc[t][:, y0:y0 + window, x0:x0 + window] += p[0].double().numpy() * np.outer(w, w)
            wsum[y0:y0 + window, x0:x0 + window] += np.outer(w, w)
    return {t: a / wsum for t, a in acc.items()}


def _pointwise(b):
    x = b["rgb"].float()
    return {"y": x * 2 + 1, "seg": torch.stack([x[:, 0], x[:, 1], x[:, 2] - 100], 1)}


def _contextual(b):  # every output pixel depends on the whole window and on its position in it
    x = b["rgb"].float()
    ramp = torch.linspace(0, 50, x.shape[-1])
    return {"y": x - x.mean((2, 3), keepdim=True) + ramp[None, None, :, None] + ramp}


@pytest.mark.parametrize("layout", ["tiled", "strips", "raw", "planar"])
def test_every_layout_reads_the_same_and_pointwise_is_exact(tmp_path, layout):
    img = _image(150, 203)
    f = tmp_path / f"{layout}.tif"
    kw = {"tiled": dict(tile=(32, 32), compression="zlib"), "strips": dict(rowsperstrip=7, compression="zlib"),
          "raw": {}, "planar": dict(tile=(16, 16), planarconfig="separate")}[layout]
    data = np.moveaxis(img, -1, 0).copy() if layout == "planar" else img
    tifffile.imwrite(f, data, photometric="rgb", **kw)
    with TiffWindows(f, cache_bytes=1 << 14) as r:
        assert (r.height, r.width, r.channels) == (150, 203, 3)
        np.testing.assert_array_equal(r.read(30, 101, 17, 200), np.moveaxis(img[30:101, 17:200], -1, 0))
    rep = predict_tiled(_pointwise, f, tmp_path / "o", window=32, overlap=8, tile=48, batch_size=5,
                        kinds={"seg": "ids"})
    assert rep.windows == 6 * 9 and rep.size == (150, 203)
    y = tifffile.imread(rep.files["y"])
    assert y.shape == (150, 203, 3) and y.dtype == np.float32
    np.testing.assert_allclose(y, img * 2.0 + 1, rtol=1e-6)  # the blend weights sum to one everywhere
    seg = tifffile.imread(rep.files["seg"])
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, np.stack([img[..., 0], img[..., 1], img[..., 2] - 100.0], 0).argmax(0))


@pytest.mark.parametrize("H,W,window,overlap,tile", [(150, 203, 32, 8, 32), (97, 64, 32, 0, 16),
                                                     (20, 45, 32, 8, 16), (300, 40, 48, 20, 64)])
def test_equals_in_memory_blend(tmp_path, H, W, window, overlap, tile):
    img = _image(H, W, seed=H)
    f = tmp_path / "in.tif"
    tifffile.imwrite(f, img, photometric="rgb", tile=(16, 16), compression="zlib")
    rep = predict_tiled(_contextual, f, tmp_path / "o", window=window, overlap=overlap, tile=tile, batch_size=3)
    got = np.moveaxis(tifffile.imread(rep.files["y"]), -1, 0)
    if H < window or W < window:  # the raster is padded by its edge to one window
        pad = np.pad(np.moveaxis(img, -1, 0), ((0, 0), (0, max(0, window - H)), (0, max(0, window - W))), mode="edge")
        want = _reference(_contextual, pad, window, overlap)["y"][:, :H, :W]
    else:
        want = _reference(_contextual, np.moveaxis(img, -1, 0), window, overlap)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_column_strips_give_the_same_file(tmp_path):
    """A raster wider than the band budget is done in column strips merged tile by tile: same values,
    same tags, no temporary file left."""
    img = _image(90, 300, seed=3)
    f = tmp_path / "wide.tif"
    tifffile.imwrite(f, img, photometric="rgb", tile=(32, 32), compression="zlib", extratags=GEO)
    kw = dict(window=32, overlap=12, tile=16, batch_size=4, kinds={"seg": "ids"})
    def fn(b):
        return {"y": _contextual(b)["y"], "seg": _pointwise(b)["seg"]}

    one = predict_tiled(fn, f, tmp_path / "one", **kw)
    # 6 channels x (16 + 32) rows x 4 bytes per column: 64 columns per strip -> 5 strips
    many = predict_tiled(fn, f, tmp_path / "many", band_bytes=6 * 48 * 4 * 70, **kw)
    assert (one.strips, many.strips) == (1, 5) and many.windows > one.windows  # boundary windows run twice
    for t in ("y", "seg"):
        np.testing.assert_array_equal(tifffile.imread(many.files[t]), tifffile.imread(one.files[t]))
        with tifffile.TiffFile(many.files[t]) as tf:
            assert tf.pages.first.tags[33550].value == (10.0, 10.0, 0.0) and tf.pages.first.is_tiled
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["wide.seg.tif", "wide.y.tif"]


def test_georeferencing_tags_are_copied(tmp_path):
    f = tmp_path / "geo.tif"
    tifffile.imwrite(f, _image(64, 80), photometric="rgb", tile=(16, 16), extratags=GEO)
    rep = predict_tiled(_pointwise, f, tmp_path / "o", window=32, tile=16, kinds={"seg": "ids"})
    for out in rep.files.values():
        with tifffile.TiffFile(out) as t:
            p = t.pages.first
            assert p.is_tiled and (p.tilelength, p.tilewidth) == (16, 16)
            assert p.tags[33550].value == (10.0, 10.0, 0.0)
            assert p.tags[33922].value == (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0)
            assert p.tags[34735].value == (1, 1, 0, 1, 1024, 0, 1, 1)
            assert p.tags[34737].value == "WGS 84|"
            assert t.is_geotiff
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _image(40, 40), photometric="rgb")
    rep = predict_tiled(_pointwise, plain, tmp_path / "o2", window=32)
    with tifffile.TiffFile(rep.files["y"]) as t:
        assert not any(c in t.pages.first.tags for c in (33550, 33922, 34735))


def test_bad_files_give_one_clear_error_and_no_output(tmp_path):
    png = tmp_path / "photo.tif"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(DataError, match=r"photo\.tif: not a readable TIFF"):
        predict_tiled(_pointwise, png, tmp_path / "o", window=32)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _image(128, 128), photometric="rgb", tile=(32, 32), compression="zlib")
    data = good.read_bytes()
    with tifffile.TiffFile(good) as t:
        cut = t.pages.first.dataoffsets[9] + 10  # the header survives, tiles 9.. are cut off
    bad = tmp_path / "cut.tif"
    bad.write_bytes(data[:cut])
    with pytest.raises(DataError, match=r"cut\.tif: .*(truncated|cannot read)"):
        predict_tiled(_pointwise, bad, tmp_path / "o", window=32, tile=32)
    assert not list((tmp_path / "o").glob("cut.*")), "a failed raster leaves no output (nor a .part file)"
    lzw = tmp_path / "lzw.tif"  # a common GeoTIFF compression that tifffile decodes only with imagecodecs
    lzw.write_bytes(data.replace(b"\x03\x01\x03\x00\x01\x00\x00\x00\x08\x00", b"\x03\x01\x03\x00\x01\x00\x00\x00\x05\x00"))
    with tifffile.TiffFile(lzw) as t:
        assert t.pages.first.compression == 5
    if importlib.util.find_spec("imagecodecs") is None:
        with pytest.raises(DataError, match=r"lzw\.tif: cannot decode it: .*imagecodecs"):
            predict_tiled(_pointwise, lzw, tmp_path / "o", window=32)
    with pytest.raises(DataError, match="no such file"):
        predict_tiled(_pointwise, tmp_path / "missing.tif", tmp_path / "o", window=32)
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, _image(100, 128), photometric="rgb")
    with pytest.raises(DataError, match="one pixel grid"):
        predict_tiled(_pointwise, {"rgb": good, "depth": other}, tmp_path / "o", window=32)


# ------------------------------------------------------------------------------- memory

CHILD = r"""
import gc, json, sys
import numpy as np, torch
from multimae.apps.tiled import predict_tiled
from multimae.model.multimae import ModelConfig, MultiMAE

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

big, small, out = sys.argv[1:4]
kw = json.loads(sys.argv[4])
torch.manual_seed(0)
cfg = ModelConfig(preset="nano", dim=48, depth=2, num_heads=2, patch_size=16, image_size=kw["window"],
                  modalities={"semseg": {"num_classes": 4}}, inputs=["rgb"], outputs=["rgb", "semseg"],
                  decoder_dim=16, decoder_depth=1, decoder_heads=2)
model = MultiMAE(cfg).eval()
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

def run(b):
    with torch.no_grad():
        p = model({"rgb": (b["rgb"].float() / 255 - mean) / std}, compute_loss=False).preds
    return {"rgb": p["rgb"], "semseg": p["semseg"]}

def peak_growth(fn):
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS
    res = fn()
    return status("VmHWM") - base, res

predict_tiled(run, small, out, name="warm", kinds={"semseg": "ids"}, **kw)  # imports, threads, kernels
x = torch.randint(0, 256, (kw["batch_size"], 3, kw["window"], kw["window"]), dtype=torch.uint8)
model_mem, _ = peak_growth(lambda: run({"rgb": x}))  # the model's own working memory for one batch
growth, rep = peak_growth(lambda: predict_tiled(run, big, out, kinds={"semseg": "ids"}, **kw))
print(json.dumps({"growth": growth, "model": model_mem, "windows": rep.windows, "strips": rep.strips}))
"""


def _write_big(path, H, W, T=256):
    """A tiled uint8 RGB raster written tile by tile (the test never holds it either)."""
    yy, xx = np.mgrid[0:T, 0:T]

    def tiles():
        for y in range(0, H, T):
            for x in range(0, W, T):
                yield np.stack([(yy + y) % 251, (xx + x) % 241, ((yy + y) * 3 + (xx + x) * 5) % 239], -1).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(H, W, 3), dtype=np.uint8, tile=(T, T), compression="zlib",
                     photometric="rgb")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_stays_under_the_bound_on_a_raster_20x_larger(tmp_path):
    """Peak resident memory growth (Linux VmHWM, reset before the call) of predict_tiled in a fresh
    process: under memory_bound + the model's own working memory, on a raster whose untiled
    prediction would hold ~20x that (and whose uint8 input alone is over it)."""
    H, W = 3072, 1024  # in column strips of 256: the bound holds in both directions
    kw = {"window": 64, "overlap": 16, "tile": 16, "batch_size": 8, "cache_bytes": 256 << 10,
          "band_bytes": 7 * (16 + 64) * 4 * 256}
    big, small = tmp_path / "big.tif", tmp_path / "small.tif"
    _write_big(big, H, W)
    _write_big(small, 100, 100)
    bound = memory_bound(W, kw["window"], kw["tile"], 3, {"rgb": 3, "semseg": 4}, kw["batch_size"],
                         kw["cache_bytes"], 1, kw["band_bytes"])
    limit = bound + (2 << 20)  # + the nano model's own working memory for a batch (measured below)
    untiled = H * W * (3 + 3 + 4) * 4  # what an in-memory prediction holds: float32 input, rgb and semseg logits
    assert untiled >= 20 * limit and H * W * 3 > limit  # even the uint8 input alone is over the limit
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",  # freed memory goes back to the system at once:
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")  # RSS follows live memory
    res = subprocess.run([sys.executable, "-c", CHILD, str(big), str(small), str(tmp_path / "o"), json.dumps(kw)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth {got['growth'] / 2**20:.1f} MB (a batch's forward alone {got['model'] / 2**20:.1f} MB), "
          f"limit {limit / 2**20:.1f} MB, untiled {untiled / 2**20:.0f} MB, {got['windows']} windows")
    assert got["strips"] == 4 and got["windows"] == 64 * 4 * 6  # 6 of the 21 window columns meet each strip
    assert got["model"] < 2 << 20
    assert 0 < got["growth"] < limit
    with tifffile.TiffFile(tmp_path / "o" / "big.rgb.tif") as t:
        assert t.pages.first.shape == (H, W, 3)


# ------------------------------------------------------------------------------- multimae predict --tiled

@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    from multimae.checkpoint import save_checkpoint
    from multimae.core.config import to_dict
    from multimae.model.multimae import MultiMAE

    root = tmp_path_factory.mktemp("tiled-run")
    mcfg = tiny_config(dim=48, modalities={"semseg": {"num_classes": 6}}, inputs=["rgb", "depth"],
                       outputs=["rgb", "depth", "semseg"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    torch.manual_seed(0)
    save_checkpoint(root / "pre", 1, MultiMAE(mcfg).state_dict(), {"step": 1},
                    {"config": {"model": to_dict(mcfg)}, "epoch": 0})
    return root / "pre"


def test_cli_tiled_equals_untiled_predictor(pretrain_run, tmp_path, capsys):
    from multimae.apps.predict import Predictor
    from multimae.apps.tiled import predictor_run_fn
    from multimae.cli.main import main

    src = tmp_path / "in"
    src.mkdir()
    one = _image(32, 32, seed=1)  # one window: tiled must equal the untiled predictor exactly
    big = _image(70, 90, seed=2)
    tifffile.imwrite(src / "one.tif", one, photometric="rgb", tile=(16, 16), extratags=GEO)
    tifffile.imwrite(src / "big.tiff", big, photometric="rgb", rowsperstrip=8, compression="zlib", extratags=GEO)
    (src / "notatiff.tif").write_bytes(b"GIF89a" + b"\0" * 64)
    out = tmp_path / "o"
    argv = ["predict", "--checkpoint", str(pretrain_run), "--input", str(src), "--out", str(out), "--tiled",
            "--overlap", "8", "--arrays", "float32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "predicted 2 rasters (0 done before, 1 bad)" in printed and "notatiff.tif: not a readable TIFF" in printed
    meta = json.loads((out / "multimae_predict.json").read_text())
    assert meta["identity"]["tiled"] == {"window": 32, "overlap": 8}
    assert meta["tasks"]["semseg"]["values"] == "ids" and meta["counts"]["bad"] == 1

    pred = Predictor.from_run(pretrain_run, device="cpu")
    ref = pred.predict_raw([{"rgb": torch.from_numpy(np.moveaxis(one, -1, 0).copy())}])[0]
    rgb = tifffile.imread(out / "one.rgb.tif")
    np.testing.assert_allclose(np.moveaxis(rgb, -1, 0), ref["rgb"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(out / "one.semseg.tif"), ref["semseg"].argmax(0).numpy())

    want = _reference(predictor_run_fn(pred), np.moveaxis(big, -1, 0).copy(), 32, 8)
    for t in ("rgb", "depth"):
        got = tifffile.imread(out / f"big.{t}.tif")
        assert got.shape[:2] == (70, 90)
        np.testing.assert_allclose(got.reshape(70, 90, -1), np.moveaxis(want[t], 0, -1), rtol=1e-4, atol=1e-4)
    with tifffile.TiffFile(out / "big.semseg.tif") as t:
        assert t.pages.first.dtype == np.uint8 and t.pages.first.tags[33550].value == (10.0, 10.0, 0.0)
        ids = t.asarray()
    assert (ids == want["semseg"].argmax(0)).mean() > 0.999  # the argmax of the blended logits (near-ties aside)

    assert main(argv) == 0  # resumes: nothing left to do but the bad file
    assert "predicted 0 rasters (2 done before, 1 bad)" in capsys.readouterr().out
    other = [a if a != "8" else "4" for a in argv]
    assert main(other) == 2  # other settings into the same folder are refused
    assert "holds predictions of another run or settings" in capsys.readouterr().err


def test_cli_tiled_with_a_paired_depth_raster(pretrain_run, tmp_path, capsys):
    from multimae.cli.main import main

    src, ddir = tmp_path / "rgb", tmp_path / "depth"
    src.mkdir()
    ddir.mkdir()
    for n in ("a", "b"):
        tifffile.imwrite(src / f"{n}.tif", _image(40, 50, seed=ord(n)), photometric="rgb")
    yy, xx = np.mgrid[0:40, 0:50]
    tifffile.imwrite(ddir / "a.tif", (1 + 0.01 * yy + 0.02 * xx).astype(np.float32), tile=(16, 16))  # b has none
    out = tmp_path / "o"
    assert main(["predict", "--checkpoint", str(pretrain_run), "--input", str(src), "--out", str(out), "--tiled",
                 "--inputs", "rgb,depth", "--pair", f"depth={ddir}", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "predicted 1 rasters (0 done before, 1 bad)" in printed and "no paired depth raster" in printed
    dep = tifffile.imread(out / "a.depth.tif")
    assert dep.shape == (40, 50) and dep.dtype == np.float16 and np.isfinite(dep).all()
    assert not list(out.glob("b.*"))


@pytest.mark.parametrize("names_in", ["spec", "file"])
def test_tiled_raster_modality_keeps_its_bands_and_nodata(tmp_path, names_in):
    """A raster modality (bands by name and index, nodata; multimae.data.rasters) read window by
    window gives what untiled predict gives on the decoded raster; the band names come from the
    spec's ``band_names`` or, as in training, from the GeoTIFF's own band descriptions."""
    rasters = pytest.importorskip("multimae.data.rasters")
    from multimae.apps.predict import Predictor
    from multimae.apps.tiled import predict_tiled_files
    from multimae.checkpoint import save_checkpoint
    from multimae.core.config import to_dict
    from multimae.model.multimae import MultiMAE

    names = [f"B{i:02d}" for i in range(1, 13)] + ["B8A"]
    spec = {"kind": "dense", "channels": 3, "bands": ["B04", "B08", 10], "nodata": 0,
            "loss": "mse", "mean": [1000.0, 2000.0, 1500.0], "std": [300.0, 500.0, 400.0]}
    if names_in == "spec":
        spec["band_names"] = names
    mcfg = tiny_config(dim=48, modalities={"s2": spec}, inputs=["s2"], outputs=["s2"], decoder_dim=16, decoder_depth=1,
                       decoder_heads=2)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "pre", 1, MultiMAE(mcfg).state_dict(), {"step": 1},
                    {"config": {"model": to_dict(mcfg)}, "epoch": 0})
    pred = Predictor.from_run(tmp_path / "pre", device="cpu", inputs=["s2"])
    a = np.random.default_rng(0).integers(1, 4000, (13, 32, 32), dtype=np.uint16)
    a[:, :5, :5] = 0  # nodata corner
    (tmp_path / "in").mkdir()
    if names_in == "spec":
        tifffile.imwrite(tmp_path / "in" / "one.tif", a, photometric="minisblack", planarconfig="separate",
                         tile=(16, 16))
    else:  # band descriptions in the file (GDAL_METADATA), stored in strips
        rasters.write_raster(tmp_path / "in" / "one.tif", a, band_names=names)
    counts = predict_tiled_files(pred, [tmp_path / "in"], tmp_path / "out", arrays="float32", progress=False)
    assert counts == {"predicted": 1, "already_done": 0, "bad": 0}
    got = np.moveaxis(tifffile.imread(tmp_path / "out" / "one.s2.tif"), -1, 0)
    raw = rasters.decode_raster(tmp_path / "in" / "one.tif", None, pred.inputs[0], "one")
    want = pred.predict_raw([{"s2": raw}])[0]["s2"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
