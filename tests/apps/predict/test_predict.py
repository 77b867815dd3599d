"""multimae predict / Predictor on real photos (scikit-image), one EXIF-rotated JPEG and a portrait
one, for each head kind and a pretraining run: files, upright sizes, values equal evaluate's forward."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from multimae.checkpoint import save_checkpoint
from multimae.cli.main import main
from multimae.core.config import load_config, to_dict
from multimae.data.transfer import TransferTransform
from multimae.model.multimae import MultiMAE
from multimae.data.codecs import decode_image
from multimae.apps.predict import META_FILE, Predictor, predict_files
from multimae.tasks.transfer import prepare
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.finetune_data import build_transform
from tiny import tiny_config, tiny_yaml

ENC = tiny_yaml(dim=48, modalities={"semseg": {"num_classes": 6}})
HEAD = {"cls": [], "semseg": ["model.head.embed_dim=64"],
        "depth": ["model.head.feature_dim=8", "model.head.layer_dims=[8,8,16,16]"],
        "normals": ["model.head.feature_dim=8", "model.head.layer_dims=[8,8,16,16]"]}


def _ft_run(root, task):
    cfg = load_config(FinetuneConfig, f"configs/finetune/synthetic-{task}.yaml",
                      [f"model.encoder={ENC}", "data.image_size=32", *HEAD[task], f"train.out_dir={root}"])
    torch.manual_seed(0)
    model, report, cfg = prepare(cfg)
    run = root / task
    save_checkpoint(run, 1, model.state_dict(), {"step": 1},
                    {"config": to_dict(cfg), "kind": "finetune", "task": task, "init_report": "scratch", "epoch": 0})
    return run, model.eval(), cfg


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {t: _ft_run(root, t) for t in HEAD}
    mcfg = tiny_config(dim=48, modalities={"semseg": {"num_classes": 6}}, inputs=["rgb", "depth"],
                       outputs=["rgb", "depth", "semseg"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    torch.manual_seed(0)
    mae = MultiMAE(mcfg)
    save_checkpoint(root / "pre", 1, mae.state_dict(), {"step": 1},
                    {"config": {"model": to_dict(mcfg)}, "epoch": 0})
    out["pretrain"] = (root / "pre", mae.eval(), None)
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    a = Image.fromarray(skdata.astronaut()[::4, ::4])  # 128x128
    ex = a.getexif()
    ex[0x0112] = 6  # "rotate 90 clockwise to view"
    c = Image.fromarray(skdata.chelsea()[::3, ::3])  # 100x151 (landscape), rotated by the tag
    c.save(d / "cat_rot.jpg", exif=ex.tobytes(), quality=95)
    Image.fromarray(np.ascontiguousarray(skdata.coffee()[:, 200:380][::4, ::4])).save(d / "coffee_portrait.png")
    a.save(d / "astronaut.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _upright(path):
    with Image.open(path) as im:
        from PIL import ImageOps
        return ImageOps.exif_transpose(im).size  # (W, H)


@pytest.mark.parametrize("task", ["cls", "semseg", "depth", "normals", "pretrain"])
def test_predict_files_sizes_values_resume(runs, photos, tmp_path, task):
    run, model, cfg = runs[task]
    pred = Predictor.from_run(run, device="cpu")
    out = tmp_path / "out"
    r = predict_files(pred, photos, out, batch_size=2, progress=False)
    assert (r.predicted, r.bad, r.already_done) == (3, 1, 0)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["counts"] == {"predicted": 3, "already_done": 0, "bad": 1}
    names = {"cat_rot": photos / "cat_rot.jpg", "coffee_portrait": photos / "coffee_portrait.png",
             "astronaut": photos / "astronaut.png"}
    assert _upright(names["cat_rot"]) == (100, 151)  # W,H swapped by the tag
    if task == "cls":
        lines = [json.loads(x) for x in (out / "classification.jsonl").read_text().splitlines()]
        assert sorted(x["image"] for x in lines) == sorted(names)
        K = len(pred.outputs["label"].classes)
        assert all(len(x["top"]) == min(5, K) and x["top"][0]["name"] in pred.outputs["label"].classes for x in lines)
    else:
        for name, path in names.items():
            for t, o in pred.outputs.items():
                # a pretraining run's reconstructions: previews only by default (--arrays)
                f = out / (f"{name}.{t}.png" if o.kind != "dense" else f"{name}.{t}.preview.png" if
                           task == "pretrain" else f"{name}.{t}.npy")
                assert task != "pretrain" or not (out / f"{name}.{t}.npy").exists()
                assert f.exists(), f
                arr = np.load(f) if f.suffix == ".npy" else np.asarray(Image.open(f))
                W, H = _upright(path)
                assert (arr.shape[:2] if f.name.endswith("preview.png") else arr.shape[-2:]) == (H, W), (f, arr.shape)
    if task == "depth":
        assert meta["png_scale"] == {"depth": 1e-3}
    if task == "pretrain":
        assert "standardised" in meta["tasks"]["depth"]["units"]
        assert set(meta["tasks"]) == {"rgb", "depth", "semseg"}
    # resume: nothing is recomputed
    r2 = predict_files(pred, photos, out, batch_size=2, progress=False)
    assert (r2.predicted, r2.already_done, r2.bad) == (0, 3, 1)

    # values: the model's forward on evaluate's preprocessing of the same (upright) image
    img = decode_image((photos / "coffee_portrait.png").read_bytes(), 3, "x")
    got = pred([img])[0]
    if task == "pretrain":
        tf = TransferTransform([model.input_specs["rgb"]], "label", None, 32, False, letterbox_eval=True)
        x = tf.transform_inputs({"rgb": img})
        with torch.no_grad():
            ref = model({"rgb": x["rgb"][None]}, compute_loss=False).preds
        p, want = got["semseg"], ref["semseg"][0]
    else:
        specs = list(model.input_specs.values())
        tf = build_transform(cfg, specs, train=False)
        sample = {"rgb": img, "label": torch.tensor(0), "__key__": "x"}
        if task != "cls":
            t = "semseg" if task == "semseg" else task
            sample[t] = torch.zeros((1 if task == "depth" else 3, *img.shape[-2:])) + 0.5 if task != "semseg" \
                else torch.zeros(img.shape[-2:], dtype=torch.int64)
        x = tf(sample)
        with torch.no_grad():
            want = model({"rgb": x["rgb"][None]})[0]
        p = got[next(iter(pred.outputs))]
    if p.ndim == 1:
        torch.testing.assert_close(p, want)
    else:  # at model resolution: the prediction resized back to the letterbox square
        H, W = img.shape[-2:]
        s = max(H, W)
        assert p.shape[-2:] == (H, W)
        up = torch.nn.functional.interpolate(want[None], size=(s, s), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(p, up[:, :H, :W])


def test_exif_rotated_equals_manually_rotated(runs, photos):
    pred = Predictor.from_run(runs["semseg"][0], device="cpu")
    rot = decode_image((photos / "cat_rot.jpg").read_bytes(), 3, "rot")
    with Image.open(photos / "cat_rot.jpg") as im:
        manual = torch.from_numpy(np.asarray(im.convert("RGB").transpose(Image.Transpose.ROTATE_270)).copy()).permute(2, 0, 1)
    assert rot.shape == manual.shape == (3, 151, 100)
    a, b = pred([rot])[0]["semseg"], pred([manual])[0]["semseg"]
    torch.testing.assert_close(a, b)


def test_window_equals_letterbox_when_it_covers_the_image(runs, photos):
    run = runs["depth"][0]
    square = decode_image((photos / "astronaut.png").read_bytes(), 3, "a")  # 128x128 > 32
    lb = Predictor.from_run(run, device="cpu")([square])[0]["depth"]
    win = Predictor.from_run(run, device="cpu", window=True)
    torch.testing.assert_close(win([square])[0]["depth"], lb, atol=1e-4, rtol=1e-4)
    portrait = decode_image((photos / "coffee_portrait.png").read_bytes(), 3, "c")
    out = win([portrait])[0]["depth"]
    assert out.shape == (1, *portrait.shape[-2:]) and torch.isfinite(out).all()


def test_cli_predict(runs, photos, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["predict", "--checkpoint", str(runs["semseg"][0]), "--input", str(photos / "astronaut.png"),
               str(photos / "cat_rot.jpg"), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0 and "predicted 2 images" in capsys.readouterr().out
    assert (out / "astronaut.semseg.color.png").exists() and (out / "semseg.legend.png").exists()
    meta = json.loads((out / META_FILE).read_text())
    assert len(meta["tasks"]["semseg"]["classes"]) == 6
    rc = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--input", str(photos), "--out", str(out)])
    assert rc == 2


def test_pretraining_run_from_rgb_and_paired_depth(runs, photos, tmp_path):
    from multimae.data.codecs import encode_png16

    run, model, _ = runs["pretrain"]
    ddir = tmp_path / "depth"
    ddir.mkdir()
    sizes = {"cat_rot": (151, 100), "astronaut": (128, 128)}  # coffee_portrait has no depth: counted bad
    for name, (H, W) in sizes.items():
        yy, xx = np.mgrid[0:H, 0:W]
        (ddir / f"{name}.png").write_bytes(encode_png16((1000 + 20 * yy + xx).astype(np.uint16)))
    pred = Predictor.from_run(run, device="cpu", inputs=["rgb", "depth"])
    out = tmp_path / "o"
    r = predict_files(pred, photos, out, batch_size=4, progress=False, pairs={"depth": ddir}, arrays="float32")
    assert (r.predicted, r.bad) == (2, 2)
    assert any("no paired depth" in b for b in r.bad_files)
    sem = np.asarray(Image.open(out / "cat_rot.semseg.png"))
    assert sem.shape == (151, 100)
    # values: the forward on evaluate's preprocessing of rgb + depth
    img = decode_image((photos / "cat_rot.jpg").read_bytes(), 3, "x")
    from multimae.data.codecs import decode_field, OFFICIAL_PNG_SCALE
    dep = decode_field((ddir / "cat_rot.png").read_bytes(), "png", model.input_specs["depth"], OFFICIAL_PNG_SCALE, "d")
    got = pred.predict_raw([{"rgb": img, "depth": dep}])[0]["depth"]
    tf = TransferTransform([model.input_specs["rgb"], model.input_specs["depth"]], "label", None, 32, False,
                           letterbox_eval=True)
    x = tf.transform_inputs({"rgb": img, "depth": dep})
    with torch.no_grad():
        want = model({"rgb": x["rgb"][None], "depth": x["depth"][None]}, compute_loss=False).preds["depth"][0]
    up = torch.nn.functional.interpolate(want[None], size=(151, 151), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got, up[:, :151, :100])
    np.testing.assert_allclose(np.load(out / "cat_rot.depth.npy"), got.numpy(), atol=1e-5, rtol=1e-5)


def test_shard_input(runs, photos, tmp_path):
    import tarfile

    tar = tmp_path / "val-000000.tar"
    with tarfile.open(tar, "w") as t:
        for key, f in (("s1", "astronaut.png"), ("s2", "cat_rot.jpg")):
            data = (photos / f).read_bytes()
            info = tarfile.TarInfo(f"{key}.{f.rsplit('.', 1)[1]}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    pred = Predictor.from_run(runs["semseg"][0], device="cpu")
    r = predict_files(pred, str(tar), tmp_path / "o", progress=False)
    assert (r.predicted, r.bad) == (2, 0)
    assert np.asarray(Image.open(tmp_path / "o" / "s2.semseg.png")).shape == (151, 100)


def test_explicit_files_from_two_folders_pair_by_their_relative_path(runs, tmp_path):
    """x/a.png and y/a.png: each one's depth is DIR/x/a.png, DIR/y/a.png (the path its output name
    mirrors), not one DIR/a.png for both."""
    from multimae.data.codecs import encode_png16

    run, _, _ = runs["pretrain"]
    ddir, files = tmp_path / "depth", []
    yy, xx = np.mgrid[0:40, 0:48]
    for sub, dep in (("x", 1000 + 20 * yy + xx), ("y", 1000 + 20 * xx + yy)):
        (tmp_path / "in" / sub).mkdir(parents=True)
        files.append(tmp_path / "in" / sub / "a.png")
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(files[-1])
        (ddir / sub).mkdir(parents=True)
        (ddir / sub / "a.png").write_bytes(encode_png16(dep.astype(np.uint16)))
    pred = Predictor.from_run(run, device="cpu", inputs=["rgb", "depth"])
    out = tmp_path / "o"
    r = predict_files(pred, [str(f) for f in files], out, progress=False, pairs={"depth": ddir}, arrays="float32")
    assert (r.predicted, r.bad) == (2, 0), r.bad_files
    assert not np.allclose(np.load(out / "x" / "a.depth.npy"), np.load(out / "y" / "a.depth.npy"))
