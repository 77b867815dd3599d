"""Multi-band rasters (issue 32 item 2): tifffile round trips, band selection and nodata, per-band
statistics, and a 13-band uint16 GeoTIFF modality trained, its statistics stored in the checkpoint
and reused by predict and the ONNX export."""
import json

import numpy as np
import pytest
import torch

from multimae.core.modalities import ModalitySpec
from multimae.data.errors import DataError
from multimae.data.rasters import decode_raster, read_raster, write_raster
from multimae.data.stats import compute_stats, fill_band_stats, write_stats

S2 = [f"B{i:02d}" for i in range(1, 13)] + ["B8A"]  # 13 Sentinel-2-like band names
SPEC = {"name": "s2", "kind": "dense", "channels": 3, "bands": ["B04", "B08", 10], "band_names": S2,
        "nodata": 0, "loss": "mse"}


def _scene(rng, size=32, corner=True):
    """(13, size, size) uint16 reflectances, band b around 1000 * (b + 1); a nodata corner."""
    arr = (rng.normal(1.0, 0.1, (13, size, size)) * (1000 * np.arange(1, 14))[:, None, None]).clip(1, 65535)
    arr = arr.astype(np.uint16)
    if corner:
        arr[:, :12, :12] = 0
    return arr


def _folder(root, n=4, size=32):
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        a = _scene(rng, size, corner=i % 2 == 0)
        write_raster(root / "train" / "s2" / "all" / f"{i:03d}.tif", a, S2, nodata=0)
        arrays.append(a)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_tifffile_round_trip_any_band_count(tmp_path, dtype):
    rng = np.random.default_rng(1)
    a = (rng.random((13, 20, 24)) * 200).astype(dtype)
    p = write_raster(tmp_path / "x.tif", a, S2, nodata=0)
    back, names = read_raster(p)
    assert back.dtype == dtype and back.shape == (13, 20, 24)
    np.testing.assert_array_equal(back, a)
    assert names == tuple(S2)
    # one band per page / band-last layouts and .npy read as (bands, H, W) too
    import tifffile

    tifffile.imwrite(tmp_path / "hwc.tif", a.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(read_raster(tmp_path / "hwc.tif")[0], a)
    np.save(tmp_path / "x.npy", a.transpose(1, 2, 0))
    np.testing.assert_array_equal(read_raster(tmp_path / "x.npy")[0], a)


def test_band_selection_by_name_and_index_and_nodata(tmp_path):
    a = _scene(np.random.default_rng(2))
    p = write_raster(tmp_path / "x.tif", a, S2, nodata=0)
    spec = ModalitySpec.from_dict(SPEC)
    x = decode_raster(p, None, spec, str(p))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_array_equal(x[:, 12:, 12:].numpy(), a[[3, 7, 10], 12:, 12:].astype(np.float32))
    assert bool(x[:, :12, :12].isnan().all()) and not bool(x[:, 12:, 12:].isnan().any())
    # names from the GeoTIFF's own band descriptions when the spec gives none
    y = decode_raster(p, None, spec.with_(band_names=()), str(p))
    torch.testing.assert_close(x, y, equal_nan=True)


@pytest.mark.parametrize("change,words", [
    ({"band_names": [], "bands": ["B04", "B99", 1]}, ["'B99'", "bands", "B8A"]),
    ({"bands": ["B04", "B08", 13]}, ["index 13", "bands"]),
    ({"nodata": -9999}, ["nodata=-9999", "uint16"]),
    ({"band_names": S2[:12], "bands": [3, 7, 10]}, ["band_names", "12"]),
])
def test_bad_bands_or_nodata_one_clear_error(tmp_path, change, words):
    p = write_raster(tmp_path / "scene.tif", _scene(np.random.default_rng(3)), S2, nodata=0)
    spec = ModalitySpec.from_dict({**SPEC, **change})
    with pytest.raises(DataError) as e:
        decode_raster(p, None, spec, str(p))
    msg = str(e.value)
    assert str(p) in msg and "'s2'" in msg
    for w in words:
        assert w in msg


def test_bad_spec_named_at_declaration():
    with pytest.raises(ValueError, match="bands keeps 3 band"):
        ModalitySpec.from_dict({**SPEC, "channels": 4})
    with pytest.raises(ValueError, match="'B99' is not in band_names"):
        ModalitySpec.from_dict({**SPEC, "bands": ["B04", "B99", 1]})
    with pytest.raises(ValueError, match="nodata must be a number"):
        ModalitySpec.from_dict({**SPEC, "nodata": "none"})


def test_stats_streamed_equal_numpy_and_recorded(tmp_path):
    arrays = _folder(tmp_path)
    spec = ModalitySpec.from_dict(SPEC)
    stats = compute_stats(tmp_path, "train", [spec])["s2"]
    sel = np.stack(arrays)[:, [3, 7, 10]].astype(np.float64)  # (N, 3, H, W)
    for c in range(3):
        v = sel[:, c][sel[:, c] != 0]
        assert stats["count"][c] == v.size
        assert stats["mean"][c] == pytest.approx(v.mean(), rel=1e-12)
        assert stats["std"][c] == pytest.approx(v.std(), rel=1e-9)
    write_stats(tmp_path, {"s2": stats})
    meta = json.loads((tmp_path / "multimae_data.json").read_text())
    assert meta["band_stats"]["s2"]["mean"] == stats["mean"]
    mods = fill_band_stats(tmp_path, {"s2": dict(SPEC)}, [spec])
    assert mods["s2"]["mean"] == stats["mean"] and mods["s2"]["std"] == stats["std"]
    # statistics of other bands are not reused silently
    other = spec.with_(bands=("B02", "B03", "B04"))
    with pytest.raises(DataError, match="run `multimae data stats` again"):
        fill_band_stats(tmp_path, {}, [other])


def test_nodata_patches_are_padding_never_visible(tmp_path):
    from multimae.data.config import MaskConfig
    from multimae.data.folder import FolderDataset
    from multimae.data.loader import BatchSpec, MaskCollator
    from multimae.data.transforms import PairedTransform

    _folder(tmp_path, n=2)
    spec = ModalitySpec.from_dict({**SPEC, "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]})
    tf = PairedTransform([spec], 32, train=False)
    ds = FolderDataset(tmp_path, "train", [spec], transform=tf, label_from_class_dir=False)
    samples = [ds[i] for i in range(2)]
    assert bool((~samples[0]["s2.valid"][0, :12, :12]).all()) and bool(samples[1]["s2.valid"].all())
    assert bool((samples[0]["s2"][:, :12, :12] == 0).all())  # nodata: 0 after normalisation
    raw = decode_raster(ds.samples[1]["s2"], None, spec, "f")
    torch.testing.assert_close(samples[1]["s2"], spec.normalize(raw))  # the spec's normalisation
    collator = MaskCollator(BatchSpec((spec,), (spec,), 8, 32), MaskConfig(num_visible=6), seed=0)
    for index in range(8):  # several plans: the all-nodata patch is never visible
        batch, plan = collator([dict(x, __batch__=(0, 0, index)) for x in samples])
        pad = batch.pad["s2"]  # 4x4 tokens of 8 px: the 12x12 nodata corner covers token (0,0) only
        assert pad.shape == (2, 16) and bool(pad[0, 0]) and int(pad[0].sum()) == 1 and not bool(pad[1].any())
        assert bool(plan.masks["s2"][0, 0])
    # and never in the loss: whatever the target holds under it, the loss is the same
    from multimae.model.multimae import ModelConfig, MultiMAE

    over = {k: v for k, v in spec.to_dict().items() if k != "name"}
    torch.manual_seed(0)
    model = MultiMAE(ModelConfig(preset="nano", image_size=32, patch_size=8, inputs=["s2"], outputs=["s2"],
                                 modalities={"s2": over})).eval()
    hidden = [j for j in range(1, 16) if bool(plan.masks["s2"][0, j])]  # patches that exist, hidden
    assert hidden
    r, c = divmod(hidden[0], 4)
    with torch.no_grad():
        loss = model(batch, plan).losses["s2"]
        batch.tensors["s2"][0, :, :8, :8] = 1e3
        assert torch.equal(model(batch, plan).losses["s2"], loss)
        batch.tensors["s2"][0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1e3  # a hidden patch that exists: counted
        assert not torch.equal(model(batch, plan).losses["s2"], loss)


def test_13_band_geotiff_trains_and_its_stats_reach_predict_and_onnx(tmp_path):
    """Raw 13-band uint16 GeoTIFFs (nodata, 3 bands kept by name and index) -> data stats ->
    pretraining (nano, 32 px, 2 steps) -> the checkpoint's spec holds the statistics -> predict and
    the ONNX export read them from there."""
    from multimae.apps.predict import Predictor
    from multimae.checkpoint import load_meta, resolve_checkpoint
    from multimae.cli.main import main
    from multimae.core.config import load_config
    from multimae.tasks.pretrain import pretrain
    from multimae.tasks.pretrain_config import PretrainConfig

    data = tmp_path / "data"
    _folder(data, n=4)
    assert main(["data", "stats", "--root", str(data), "--modality", json.dumps(SPEC)]) == 0
    stats = json.loads((data / "multimae_data.json").read_text())["band_stats"]["s2"]
    cfg = load_config(PretrainConfig, None, [
        "model.preset=nano", "model.image_size=32", "model.patch_size=8", "model.inputs=[s2]", "model.outputs=[s2]",
        f"model.modalities={{s2: {json.dumps({k: v for k, v in SPEC.items() if k != 'name'})}}}", "data.source=folder", f"data.root={data}",
        "data.num_workers=0", "mask.num_visible=8", "train.batch_size=2", "train.max_steps=2",
        f"train.out_dir={tmp_path / 'runs'}", "train.run_name=s2"])
    run = pretrain(cfg, evaluate=False)
    ckpt = resolve_checkpoint(run)
    saved = load_meta(ckpt)["model_config"]["modalities"]["s2"]  # the checkpoint's own spec of s2
    assert saved["mean"] == stats["mean"] and saved["std"] == stats["std"] and saved["bands"] == ["B04", "B08", 10]
    pred = Predictor.from_run(ckpt, device="cpu", precision="fp32", inputs=["s2"])
    spec = pred.inputs[0]
    assert list(spec.mean) == stats["mean"] and list(spec.std) == stats["std"] and spec.nodata == 0
    raw = decode_raster(data / "train" / "s2" / "all" / "000.tif", None, spec, "f")
    out = pred.predict_raw([{"s2": raw}])[0]["s2"]
    assert out.shape == (3, 32, 32) and bool(torch.isfinite(out).all())
    x = torch.nan_to_num(spec.normalize(raw), nan=0.0)  # the stored statistics, nodata 0
    torch.testing.assert_close(pred.model_inputs({"s2": raw})["s2"], x)
    from multimae.apps.export import export_onnx, run_onnx

    info = export_onnx(ckpt, tmp_path / "enc.onnx", inputs=["s2"], encoder_only=True, check=False)
    meta = info.metadata
    assert json.loads(meta["multimae.input_mean"])["s2"] == stats["mean"]
    assert json.loads(meta["multimae.input_std"])["s2"] == stats["std"]
    assert json.loads(meta["multimae.input_specs"])["s2"]["bands"] == ["B04", "B08", 10]
    got = run_onnx(tmp_path / "enc.onnx", {"s2": x[None]})
    assert np.isfinite(got).all()


def test_modality_behaviour_comes_from_spec_fields():
    """Normals' angular scoring and 3-channel head come from the spec (unit_vectors, channels),
    not from the name: a renamed copy behaves alike, a plain dense target does not."""
    from multimae.core.config import load_config
    from multimae.tasks.transfer import dense_target_spec
    from multimae.tasks.finetune_config import FinetuneConfig
    from multimae.tasks.finetune_eval import scorer_for

    cfg = load_config(FinetuneConfig, "configs/finetune/synthetic-normals.yaml", [])
    assert dense_target_spec(cfg).unit_vectors and scorer_for(cfg).angular
    enc = ("model.encoder={preset: nano, patch_size: 8, image_size: 32, modalities: "
           "{vec: {kind: dense, channels: 3, unit_vectors: true}, heat: {kind: dense, channels: 2}}}")
    vec = load_config(FinetuneConfig, "configs/finetune/synthetic-normals.yaml", [enc, "data.target=vec"])
    heat = load_config(FinetuneConfig, "configs/finetune/synthetic-normals.yaml", [enc, "data.target=heat"])
    assert scorer_for(vec).angular and not scorer_for(heat).angular
    assert dense_target_spec(heat).channels == 2


def test_synthetic_scenes_write_their_bands_beside_the_folder(tmp_path):
    from multimae.cli.main import main
    from multimae.data.synthetic import MULTISPECTRAL_BANDS, multispectral

    assert main(["data", "synthetic", "--out", str(tmp_path), "--num", "3", "--size", "32", "--bands", "ms"]) == 0
    rgb = sorted(p.relative_to(tmp_path / "train" / "rgb").with_suffix("") for p in (tmp_path / "train" / "rgb").rglob("*.*"))
    ms = sorted(p.relative_to(tmp_path / "train" / "ms").with_suffix("") for p in (tmp_path / "train" / "ms").rglob("*.tif"))
    assert rgb == ms and len(ms) == 3  # same class directories and names: one aligned sample each
    arr, names = read_raster(next((tmp_path / "train" / "ms").rglob("*.tif")))
    assert arr.dtype == np.uint16 and arr.shape == (5, 32, 32) and names == MULTISPECTRAL_BANDS
    scenes = [multispectral(0, i, 32)[0] for i in range(9)]
    cut = [bool((a == 0).all(0).any()) for a in scenes]
    assert any(cut) and not all(cut)  # some scenes miss a swath corner (nodata 0 in every band)
    assert all(bool(((a == 0).any(0) == (a == 0).all(0)).all()) for a in scenes)


def test_band_stats_chunked_merge_is_exact(monkeypatch):
    """Chunks of any size merge to numpy's two-pass statistics (large offsets: no cancellation)."""
    from multimae.data.stats import BandStats

    rng = np.random.default_rng(5)
    x = rng.normal(3e4, 3.0, (2, 37, 41))
    x[0, :5] = np.nan
    monkeypatch.setattr(BandStats, "CHUNK", 97)
    acc = BandStats(2)
    acc.update(x[:, :20])
    acc.update(x[:, 20:])
    for c in range(2):
        v = x[c][np.isfinite(x[c])]
        assert acc.count[c] == v.size
        assert acc.mean[c] == pytest.approx(v.mean(), rel=1e-13)
        assert acc.std()[c] == pytest.approx(v.std(), rel=1e-9)


def test_a_file_nodata_the_spec_does_not_name_is_said(tmp_path, caplog):
    p = write_raster(tmp_path / "x.tif", _scene(np.random.default_rng(6)), S2, nodata=0)
    spec = ModalitySpec.from_dict({**SPEC, "nodata": 1})
    with caplog.at_level("WARNING", logger="multimae.data"):
        x = decode_raster(p, None, spec, str(p))
    assert not bool(x.isnan().any())  # its 0 pixels stay values: the spec decides...
    assert "GDAL nodata tag is 0" in caplog.text and str(p) in caplog.text  # ...and a notice says so


def test_data_check_takes_the_modalities_a_config_declares(tmp_path, capsys):
    """``data check --config``: a raster modality declared only in a run config is checked and its
    coverage printed; without the config the unknown name is one line naming the way out."""
    from multimae.cli.main import main

    assert main(["data", "synthetic", "--out", str(tmp_path), "--num", "6", "--size", "32", "--bands", "ms"]) == 0
    tifs = sorted((tmp_path / "train" / "ms").rglob("*.tif"))
    for f in tifs[::3]:
        f.unlink()
    capsys.readouterr()
    rc = main(["data", "check", "--folder", str(tmp_path), "--config", "synthetic-bands", "--missing", "allow"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "rgb: 6 of 6 (100.0%)" in out.out and "ms: 4 of 6 (66.7%)" in out.out
    assert main(["data", "check", "--folder", str(tmp_path), "--modalities", "rgb,ms"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown modality 'ms'" in err and "--config" in err
