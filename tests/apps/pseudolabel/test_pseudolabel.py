"""``multimae pseudolabel`` end to end with tiny random-init transformers models (no download):
outputs at each image's size and dtype, the layout loads and pretrains, a pretrained MultiMAE
labels too, resume, corrupt input, shards, and the COCO panoptic 133-class mapping."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers", reason="pip install -e '.[pseudolabel]' (make setup does)")

from multimae.cli.main import main  # noqa: E402
from multimae.data.folder import FolderDataset  # noqa: E402
from multimae.apps.pseudolabel.tiny import save_tiny_dpt, save_tiny_mask2former, save_tiny_segformer  # noqa: E402
from multimae.apps.pseudolabel import (  # noqa: E402
    build_label_map, coco_panoptic_categories, encode_depth, load_labeler, panoptic_to_semantic, pseudolabel,
)
from tiny import TINY_OVERRIDES

SIZES = {"astronaut.jpg": (96, 128), "sub/coffee.png": (80, 60), "chelsea.webp": (50, 70)}


def _photos(root: Path) -> Path:
    from skimage import data

    src = {"astronaut.jpg": data.astronaut(), "sub/coffee.png": data.coffee(), "chelsea.webp": data.chelsea()}
    for name, (h, w) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[name]).resize((w, h)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Tiny models, photos (one corrupt), and one CLI run over them."""
    tmp = tmp_path_factory.mktemp("pl")
    save_tiny_dpt(tmp / "dpt")
    save_tiny_mask2former(tmp / "m2f")
    photos = _photos(tmp / "photos")
    out = tmp / "data"
    rc = main(["pseudolabel", "--input", str(photos), "--out", str(out), "--split", "train", "--depth",
               str(tmp / "dpt"), "--semseg", str(tmp / "m2f"), "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return tmp, photos, out


def test_outputs_at_each_images_size_and_dtype(labelled, capsys):
    tmp, photos, out = labelled
    for name, (h, w) in SIZES.items():
        stem = name.replace("/", "__").rsplit(".", 1)[0]
        ext = name.rsplit(".", 1)[1]
        rgb = out / "train/rgb/all" / f"{stem}.{ext}"
        assert rgb.read_bytes() == (photos / name).read_bytes()  # copied, not re-encoded
        depth = Image.open(out / "train/depth/all" / f"{stem}.png")
        semseg = Image.open(out / "train/semseg/all" / f"{stem}.png")
        assert depth.mode.startswith("I;16") and depth.size == (w, h)
        assert semseg.mode == "L" and semseg.size == (w, h)
        d = np.asarray(depth).astype(np.int64)
        assert d.min() >= 1 and d.max() == 65535  # relative depth: per-image range, every pixel valid
        assert np.asarray(semseg).max() < 133
    assert not list(out.glob("train/*/all/broken.*"))
    meta = json.loads((out / "multimae_data.json").read_text())
    assert meta["png_scale"]["depth"] == pytest.approx(1 / 65535)
    assert meta["pseudolabel"]["depth"]["units"] == "relative"
    sem = meta["pseudolabel"]["semseg"]
    assert sem["label_set"] == "coco-panoptic-133" and sem["num_classes"] == 133
    assert (out / "semseg_classes.txt").read_text().splitlines() == sem["classes"]


def test_layout_loads_pretrains_and_the_result_labels_again(labelled, tmp_path):
    from multimae.core.config import load_config
    from multimae.tasks.pretrain_config import PretrainConfig
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask

    _, photos, out = labelled
    ds = FolderDataset(out, "train", ["rgb", "depth", "semseg"])
    assert len(ds) == 3
    s = ds[0]
    assert s["depth"].shape[-2:] == s["rgb"].shape[-2:] == s["semseg"].shape
    assert 0 < float(s["depth"].min()) and float(s["depth"].max()) == pytest.approx(1.0)
    # the end-of-run figure reads a "val" split: the same images serve (a user labels a val split too)
    if not (out / "val").exists():
        shutil.copytree(out / "train", out / "val")
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", [
        *TINY_OVERRIDES, "model.modalities={}",
        "data.source=folder", f"data.root={out}", "data.split=train", "data.num_workers=0",
        "data.cache=false", "mask.num_visible=12", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
        "train.figure_at_end=false", f"train.out_dir={tmp_path}", "train.run_name=pl"])
    run = Trainer(PretrainTask(cfg)).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows) and "loss/semseg" in rows[-1]

    # the pretrained MultiMAE (133-class semseg head) is a labeller of both tasks
    out2 = tmp_path / "by-multimae"
    assert main(["pseudolabel", "--input", str(out / "train"), "--out", str(out2), "--depth", str(run),
                 "--semseg", str(run), "--device", "cpu", "--no-progress", "--batch-size", "3"]) == 0
    ds2 = FolderDataset(out2, "train", ["rgb", "depth", "semseg"])
    assert len(ds2) == 3 and ds2[2]["semseg"].shape == ds[2]["semseg"].shape
    meta = json.loads((out2 / "multimae_data.json").read_text())["pseudolabel"]
    assert meta["depth"]["labeler"] == meta["semseg"]["labeler"] == "multimae"


def test_resume_skips_finished_files_and_bad_input_is_counted(labelled, capsys):
    tmp, photos, out = labelled
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "train/semseg/all/chelsea.png").unlink()
    args = ["pseudolabel", "--input", str(photos), "--out", str(out), "--depth", str(tmp / "dpt"),
            "--semseg", str(tmp / "m2f"), "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0
    report = capsys.readouterr().out
    assert "labelled 1 image(s)" in report and "2 already done" in report and "1 bad input(s)" in report
    assert (out / "train/semseg/all/chelsea.png").is_file()
    for p, t in stamp.items():
        if "chelsea" not in p.name:
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temp file
    # --on-error raise: exit 2 with one line naming the file
    (out / "train/semseg/all/chelsea.png").unlink()
    assert main(args + ["--on-error", "raise"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


class ConstLabeler:
    """The Labeler protocol in a few lines: depth = row index + 1, semseg = column parity."""

    tasks = ("depth", "semseg")

    def info(self):
        return {"depth": {"units": "metric"}, "semseg": {"num_classes": 2, "classes": ["even", "odd"]}}

    def __call__(self, images):
        depth = [torch.arange(1, img.shape[1] + 1, dtype=torch.float32)[None, :, None].expand(1, -1, img.shape[2])
                 for img in images]
        semseg = [(torch.arange(img.shape[2]) % 2).expand(img.shape[1], -1) for img in images]
        return {"depth": depth, "semseg": semseg}


def test_custom_labeler_shards_in_and_out(labelled, tmp_path):
    import webdataset as wds

    from multimae.data.shards import ShardDataset

    _, photos, _ = labelled
    shard = tmp_path / "in-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i, name in enumerate(["astronaut.jpg", "chelsea.webp"]):
            w.write({"__key__": f"s{i}", name.rsplit(".", 1)[1]: (photos / name).read_bytes()})
        w.write({"__key__": "bad", "jpg": b"nope"})
    rep = pseudolabel(str(shard), tmp_path / "out", [ConstLabeler()], fmt="shards", progress=False)
    assert (rep.labelled, rep.bad) == (2, 1)
    ds = ShardDataset(rep.outputs, ["rgb", "depth", {"name": "semseg", "num_classes": 2}], shuffle_buffer=0)
    samples = {s["__key__"]: s for s in ds}
    assert set(samples) == {"s0", "s1"}
    s = samples["s1"]
    h, w = SIZES["chelsea.webp"]
    assert s["rgb"].shape == (3, h, w) and s["semseg"].shape == (h, w)
    assert torch.allclose(s["depth"][0, :, 0], torch.arange(1, h + 1, dtype=torch.float32))  # metric, in mm
    assert s["semseg"][0, :4].tolist() == [0, 1, 0, 1]


def test_depth_encoding():
    q, scale = encode_depth(torch.tensor([[[0.5, 2.0], [float("nan"), 3.0]]]), "relative")
    assert scale == pytest.approx(1 / 65535) and q.tolist() == [[1, 39321], [0, 65535]]
    q, scale = encode_depth(torch.tensor([[[-1.0, 0.0015], [70.0, 2.0]]]), "metric")
    assert scale == 1e-3 and q.tolist() == [[0, 2], [65535, 2000]]


def test_coco_panoptic_table():
    cats = coco_panoptic_categories()
    assert len(cats) == 133 and sum(c.isthing for c in cats) == 80
    assert all(c.isthing for c in cats[:80]) and not any(c.isthing for c in cats[80:])
    assert len({c.coco_id for c in cats}) == 133 and [c.coco_id for c in cats] == sorted(c.coco_id for c in cats)
    assert (cats[0].name, cats[0].coco_id, cats[79].name, cats[79].coco_id) == ("person", 1, "toothbrush", 90)
    assert (cats[80].name, cats[80].coco_id, cats[132].name, cats[132].coco_id) == ("banner", 92, "rug-merged", 200)


def test_panoptic_output_maps_to_the_133_ids():
    # a DETR-style model: labels keyed by COCO category ids, names spelled differently
    id2label = {1: "person", 18: "dog", 184: "tree_merged", 187: "Sky Other Merged", 200: "rug-merged"}
    lmap = build_label_map(id2label)
    assert lmap.label_set == "coco-panoptic-133" and len(lmap.names) == 133
    seg = torch.tensor([[1, 1, 2, 0], [3, 3, 2, 4], [5, 5, 5, 4]], dtype=torch.int32)
    info = [{"id": 1, "label_id": 18}, {"id": 2, "label_id": 1}, {"id": 3, "label_id": 184},
            {"id": 4, "label_id": 187}, {"id": 5, "label_id": 200}]
    fill = torch.full((3, 4), 7)
    out = panoptic_to_semantic(seg, info, lmap, fill)
    assert out.tolist() == [[16, 16, 0, 7], [116, 116, 0, 119], [132, 132, 132, 119]]
    assert [lmap.names[i] for i in (16, 116, 119)] == ["dog", "tree-merged", "sky-other-merged"]
    # other label sets stay the model's own, renumbered in id order; forcing coco names the strays
    own = build_label_map({0: "lava", 5: "person", 2: "sky"})
    assert own.label_set == "own" and own.names == ["lava", "sky", "person"]
    assert own(torch.tensor([5, 0, 2])).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="lava"):
        build_label_map({0: "lava", 1: "person"}, "coco")


def test_panoptic_mode_semantic_model_and_bad_labeler_paths(labelled, tmp_path):
    tmp, photos, _ = labelled
    lab = load_labeler(tmp / "m2f", "semseg", device="cpu", mode="panoptic")
    img = torch.from_numpy(np.asarray(Image.open(photos / "chelsea.webp").convert("RGB")).copy()).permute(2, 0, 1)
    (m,) = lab([img])["semseg"]
    assert m.shape == img.shape[1:] and m.dtype == torch.int64 and int(m.max()) < 133
    # bf16 autocast (forced; emulated on CPUs without it) still gives float32 maps at the image's size
    (d,) = load_labeler(tmp / "dpt", "depth", device="cpu", precision="bf16")([img])["depth"]
    assert d.dtype == torch.float32 and d.shape == (1, *img.shape[1:]) and bool(torch.isfinite(d).all())
    # a semantic-segmentation model keeps its own label set; the names are written beside the data
    segformer = load_labeler(save_tiny_segformer(tmp_path / "segformer"), "semseg", device="cpu")
    rep = pseudolabel(photos, tmp_path / "own", [segformer], progress=False, limit=2)
    assert rep.labelled + rep.bad == 2
    assert (tmp_path / "own/semseg_classes.txt").read_text().split("\n")[:3] == ["lava", "sky", "grass"]
    meta = json.loads((tmp_path / "own/multimae_data.json").read_text())["pseudolabel"]["semseg"]
    assert (meta["label_set"], meta["num_classes"]) == ("own", 3)
    ds = FolderDataset(tmp_path / "own", "train", ["rgb", {"name": "semseg", "num_classes": 3}])
    assert len(ds) == rep.labelled and ds[0]["semseg"].shape == ds[0]["rgb"].shape[1:]
    assert main(["pseudolabel", "--input", str(photos), "--out", str(tmp_path / "o"), "--depth",
                 str(tmp_path)]) == 2  # not a model directory: one line, exit 2
    assert main(["pseudolabel", "--input", str(photos), "--out", str(tmp_path / "o")]) == 2  # no labeller


def test_chunked_upsampled_argmax_equals_the_full_one():
    import torch.nn.functional as F

    from multimae.apps.pseudolabel.labelers import upsampled_argmax

    scores = torch.randn(133, 13, 17)
    full = F.interpolate(scores[None], size=(50, 70), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(upsampled_argmax(scores, (50, 70), chunk=16), full)


class OtherModel(ConstLabeler):
    def info(self):
        out = super().info()
        return {t: {**v, "model": "another/checkpoint"} for t, v in out.items()}


def test_duplicate_shard_keys_are_bad_and_another_labeller_is_refused(labelled, tmp_path):
    import webdataset as wds

    from multimae.data.errors import DataError

    _, photos, _ = labelled
    for i in range(2):  # the same key in two shards
        with wds.TarWriter(str(tmp_path / f"in-{i:06d}.tar")) as w:
            w.write({"__key__": "same", "jpg": (photos / "astronaut.jpg").read_bytes()})
            w.write({"__key__": f"own{i}", "jpg": (photos / "astronaut.jpg").read_bytes()})
    out = tmp_path / "out"
    rep = pseudolabel(str(tmp_path / "in-{000000..000001}.tar"), out, [ConstLabeler()], progress=False)
    assert (rep.labelled, rep.bad) == (3, 1)
    with pytest.raises(DataError, match="use another --out"):
        pseudolabel(str(tmp_path / "in-000000.tar"), out, [OtherModel()], progress=False)
    rep = pseudolabel(str(tmp_path / "in-000000.tar"), out, [ConstLabeler()], progress=False)
    assert (rep.labelled, rep.already_done) == (0, 2)
