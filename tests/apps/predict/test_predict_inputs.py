"""multimae predict through the CLI on real photos (scikit-image) and crafted inputs: unique output
paths, run identity in --out, shards from the command line, symlink loops, GIF, the pixel budget,
band-by-band resizing equal to a full-size one, no partial .npy, and peak memory on a 24 MP photo
through a 150-class segmentation head (measured in a subprocess)."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from multimae.checkpoint import save_checkpoint
from multimae.cli.main import main
from multimae.core.config import load_config, to_dict
from multimae.data.errors import DataError
from multimae.apps.predict import META_FILE, Output, Predictor, write_prediction
from multimae.apps.predict_io import LowRes, write_array, write_preview
from multimae.tasks.transfer import prepare
from multimae.tasks.finetune_config import FinetuneConfig
from tiny import tiny_yaml

ENC = tiny_yaml(dim=48)
REPO = Path(__file__).resolve().parents[3]


def seg_run(root: Path, num_classes: int = 6, seed: int = 0) -> Path:
    cfg = load_config(FinetuneConfig, str(REPO / "configs/finetune/synthetic-semseg.yaml"),
                      [f"model.encoder={ENC}", "data.image_size=32", "model.head.embed_dim=64",
                       f"model.head.num_classes={num_classes}", f"train.out_dir={root}"])
    torch.manual_seed(seed)
    model, _, cfg = prepare(cfg)
    run = root / f"seg{num_classes}-{seed}"
    save_checkpoint(run, 1, model.state_dict(), {"step": 1},
                    {"config": to_dict(cfg), "kind": "finetune", "task": "semseg", "init_report": "scratch", "epoch": 0})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return seg_run(root, seed=0), seg_run(root, seed=1)


@pytest.fixture(scope="module")
def photo_bytes():
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()[::8, ::8]).save(buf, format="PNG")  # 64x64
    return buf.getvalue()


def predict(*args: str) -> int:
    return main(["predict", *args, "--no-progress", "--device", "cpu"])


def test_inputs_sharing_a_stem_get_their_own_outputs(runs, photo_bytes, tmp_path, capsys):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.png").write_bytes(photo_bytes)
    out = tmp_path / "o"
    assert predict("--checkpoint", str(runs[0]), "--input", str(tmp_path / "x/a.png"), str(tmp_path / "y/a.png"),
                   "--out", str(out)) == 0
    assert "predicted 2 images" in capsys.readouterr().out
    assert (out / "x/a.semseg.png").is_file() and (out / "y/a.semseg.png").is_file()
    # a dataset's rgb/catA/img1 and rgb/catB/img1
    for c in ("catA", "catB"):
        (tmp_path / "ds/val/rgb" / c).mkdir(parents=True)
        (tmp_path / "ds/val/rgb" / c / "img1.png").write_bytes(photo_bytes)
    out2 = tmp_path / "o2"
    assert predict("--checkpoint", str(runs[0]), "--input", str(tmp_path / "ds/val"), "--out", str(out2)) == 0
    assert "predicted 2 images" in capsys.readouterr().out
    assert (out2 / "catA/img1.semseg.png").is_file() and (out2 / "catB/img1.semseg.png").is_file()
    # two files that would write the same outputs (same folder and stem): the second is a bad input
    (tmp_path / "x/a.jpg").write_bytes(photo_bytes)
    out3 = tmp_path / "o3"
    assert predict("--checkpoint", str(runs[0]), "--input", str(tmp_path / "x/a.png"), str(tmp_path / "x/a.jpg"),
                   "--out", str(out3)) == 0
    text = capsys.readouterr().out
    assert "predicted 1 images (0 done before, 1 bad)" in text and "would overwrite" in text and "a.jpg" in text


def test_rerun_into_the_same_out_with_another_run_is_refused(runs, photo_bytes, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/p.png").write_bytes(photo_bytes)
    out = tmp_path / "o"
    assert predict("--checkpoint", str(runs[0]), "--input", str(tmp_path / "in"), "--out", str(out)) == 0
    ident = json.loads((out / META_FILE).read_text())["identity"]
    assert ident["checkpoint"].startswith(str(runs[0].resolve())) and ident["weights"]
    before = (out / "p.semseg.png").read_bytes()
    capsys.readouterr()
    assert predict("--checkpoint", str(runs[1]), "--input", str(tmp_path / "in"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "holds predictions of another run" in err and "new --out" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "p.semseg.png").read_bytes() == before
    assert json.loads((out / META_FILE).read_text())["identity"] == ident  # still names the first run
    # the same run again: everything is done already
    assert predict("--checkpoint", str(runs[0]), "--input", str(tmp_path / "in"), "--out", str(out)) == 0
    assert "predicted 0 images (1 done before, 0 bad)" in capsys.readouterr().out


def _tar(path: Path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for key, data in samples.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_shards_from_the_command_line(runs, photo_bytes, tmp_path, capsys):
    for i in range(3):
        _tar(tmp_path / f"s-{i:06d}.tar", {f"k{i}a": photo_bytes, f"k{i}b": photo_bytes})
    shards = [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]  # what the shell makes of shards/*.tar
    assert predict("--checkpoint", str(runs[0]), "--input", *shards, "--out", str(tmp_path / "o1")) == 0
    assert "predicted 6 images" in capsys.readouterr().out
    brace = str(tmp_path / "s-{000000..000001}.tar")  # a quoted brace pattern
    assert predict("--checkpoint", str(runs[0]), "--input", brace, "--out", str(tmp_path / "o2")) == 0
    assert "predicted 4 images" in capsys.readouterr().out
    assert (tmp_path / "o2/k1b.semseg.png").is_file()
    # the same key in two shards: the second one is a bad input, not an overwrite
    _tar(tmp_path / "dup.tar", {"k0a": photo_bytes})
    assert predict("--checkpoint", str(runs[0]), "--input", shards[0], str(tmp_path / "dup.tar"),
                   "--out", str(tmp_path / "o3")) == 0
    assert "predicted 2 images (0 done before, 1 bad)" in capsys.readouterr().out


def test_symlink_loops_are_walked_once_and_gif_is_read(runs, photo_bytes, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "a/p.png").write_bytes(photo_bytes)
    Image.open(io.BytesIO(photo_bytes)).convert("P").save(src / "a/anim.gif")
    os.symlink("..", src / "a/loop")  # a -> in -> a -> ...
    (src / "b").mkdir()
    os.symlink(str(src / "a"), src / "b/to_a")  # a second way into a
    os.symlink(str(src), src / "b/to_root")
    out = tmp_path / "o"
    assert predict("--checkpoint", str(runs[0]), "--input", str(src), "--out", str(out)) == 0
    assert "predicted 2 images (0 done before, 0 bad)" in capsys.readouterr().out
    assert (out / "a/anim.semseg.png").is_file()
    assert np.asarray(Image.open(out / "a/anim.semseg.png")).shape == (64, 64)


def test_an_image_over_the_pixel_budget_is_a_bad_input(runs, photo_bytes, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "small.png").write_bytes(photo_bytes)
    Image.new("L", (3000, 2000)).save(src / "big.png")  # 6 MP of zeros: a few KB
    out = tmp_path / "o"
    assert predict("--checkpoint", str(runs[0]), "--input", str(src), "--out", str(out), "--max-pixels", "1000000") == 0
    text = capsys.readouterr().out
    assert "predicted 1 images (0 done before, 1 bad)" in text
    assert "big.png: 3000x2000 = 6000000 pixels is over the budget of 1000000" in text
    assert sorted(p.name for p in out.iterdir() if "big" in p.name) == []
    # a PNG whose header claims 200 MP (PIL's decompression-bomb error): the same one line
    from multimae.apps.predict_io import check_pixels

    Image.new("1", (20000, 10000)).save(src / "bomb.png")
    with pytest.raises(DataError, match="bomb.png: over the budget of 40000000 pixels"):
        check_pixels((src / "bomb.png").read_bytes(), 40_000_000, str(src / "bomb.png"))


def test_bands_equal_a_full_size_resize():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 32, 32, generator=g)
    for h, w in ((151, 100), (40, 97), (32, 32), (7, 300)):
        s = max(h, w)
        want = F.interpolate(p[None], size=(s, s), mode="bilinear", align_corners=False)[0][:, :h, :w]
        lr = LowRes(p, (h, w), (s, s))
        torch.testing.assert_close(lr.full(), want)
        bands = list(lr.bands(budget=4 * 5 * w * 3))  # 3 rows at a time
        assert len(bands) == -(-h // 3)
        torch.testing.assert_close(torch.cat([b for _, _, b in bands], 1), want)
        plain = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(LowRes(p, (h, w), (h, w)).full(), plain)


@pytest.mark.parametrize("C", [2, 20, 150])
def test_class_ids_cell_by_cell_equal_the_full_argmax(C, monkeypatch):
    monkeypatch.setattr("multimae.apps.predict_io.BAND_BYTES", 1000)  # never the direct path
    g = torch.Generator().manual_seed(C)
    p = torch.randn(C, 16, 16, generator=g)
    for h, w, up in ((151, 100, (151, 151)), (300, 41, (300, 41)), (9, 13, (13, 13))):
        lr = LowRes(p, (h, w), up)
        ids = np.full((h, w), -1, np.int64)
        lr.class_ids(ids)
        np.testing.assert_array_equal(ids, lr.full().argmax(0).numpy())


def test_rgb_preview_undoes_the_imagenet_normalisation(tmp_path):
    from multimae.core.modalities import get as get_spec

    spec = get_spec("rgb")
    img = torch.from_numpy(skdata.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    norm = (img - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    write_preview(tmp_path / "p.png", LowRes(norm, (64, 64), (64, 64)), spec.mean, spec.std)
    got = np.asarray(Image.open(tmp_path / "p.png")).astype(int)
    assert np.abs(got - skdata.astronaut()[::8, ::8].astype(int)).max() <= 1


def test_no_partial_npy_when_writing_fails(tmp_path, monkeypatch):
    lr = LowRes(torch.randn(3, 16, 16), (400, 300), (400, 400))
    calls = {"n": 0}
    real = LowRes.band

    def failing(self, y0, y1):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return real(self, y0, y1)

    monkeypatch.setattr(LowRes, "band", failing)
    monkeypatch.setattr("multimae.apps.predict_io.BAND_BYTES", 4 * 3 * 300 * 10)
    with pytest.raises(MemoryError):
        write_prediction(tmp_path, "normals", Output("dense"), "x", lr, arrays="float16")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(LowRes, "band", real)
    write_array(tmp_path / "x.npy", lr, "float16")
    arr = np.load(tmp_path / "x.npy")
    assert arr.dtype == np.float16 and arr.shape == (3, 400, 300)


MEASURE = textwrap.dedent("""
    import resource, sys
    from multimae.apps.predict import Predictor, predict_files
    pred = Predictor.from_run(sys.argv[1], device="cpu")
    r = predict_files(pred, [sys.argv[2]], sys.argv[3], batch_size=1, progress=False)
    assert r.predicted == 1, r
    print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_of_a_24mp_photo_through_a_150_class_head(tmp_path):
    run = seg_run(tmp_path, num_classes=150)
    photo = tmp_path / "phone.jpg"
    Image.fromarray(skdata.astronaut()).resize((6000, 4000), Image.BILINEAR).save(photo, quality=85)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", MEASURE, str(run), str(photo), str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    peak_gb = int(res.stdout.split("PEAK_KB")[1]) / 2**20
    # full-resolution float logits alone would be 150 * 24e6 * 4 B = 14.4 GB
    assert peak_gb < 3.0, peak_gb
    ids = np.asarray(Image.open(tmp_path / "o/phone.semseg.png"))
    assert ids.shape == (4000, 6000) and ids.dtype == np.uint8 and ids.max() < 150
    print(f"peak {peak_gb:.2f} GB")


DECODE = textwrap.dedent("""
    import io, warnings
    from PIL import Image
    from multimae.data.codecs import decode_image
    warnings.simplefilter("error")
    for mode, channels, fmt in (("L", 1, "PNG"), ("P", 1, "GIF"), ("RGB", 3, "JPEG"), ("I;16", 1, "PNG")):
        buf = io.BytesIO()
        Image.new(mode, (8, 6)).save(buf, format=fmt)
        assert decode_image(buf.getvalue(), channels, "x").shape == (channels, 6, 8)
    print("OK")
""")


def test_decoding_images_gives_no_not_writable_warning():
    """torch warns (once per process, hence a subprocess) "the given NumPy array is not writable"
    for PIL's read-only arrays: a decoded image is a copy."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-1500:]
