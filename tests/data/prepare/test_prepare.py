"""``multimae data prepare``: fixtures written here in the upstream formats (NYUv2 v7.3 HDF5 with
h5py's reversed dimensions, v5 splits / mapping mats, an ADE20K tree, a tiny ImageNet with a flat
val and each ground-truth file, a COCO captions JSON); the outputs read back with the library's
readers, resumed, used by a 2-step finetune / pretrain through the CLI; wrong inputs -> one line."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

h5py = pytest.importorskip("h5py", reason="pip install -e '.[datasets]' (make setup does)")
sio = pytest.importorskip("scipy.io", reason="pip install -e '.[datasets]' (make setup does)")

from multimae.core import modalities  # noqa: E402
from multimae.cli.main import main  # noqa: E402
from multimae.data.folder import FolderDataset, read_meta  # noqa: E402
from tiny import tiny_encoder_override  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
H, W = 12, 16  # NYUv2 is 480 x 640; same aspect, tiny
SEMSEG256 = modalities.get("semseg").with_(num_classes=256)  # 255 (ignore) readable
TINY_FT = [tiny_encoder_override(depth=1, image_size=16),
           "data.image_size=16", "data.num_workers=0", "train.batch_size=2", "train.eval_batch_size=4",
           "train.epochs=1", "train.log_every=1", "train.precision=fp32", "train.resume=null"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def finetune(tmp_path: Path, config: str, root: Path, name: str, *extra: str) -> dict:
    rc = main(["finetune", "--config", f"configs/finetune/{config}", *TINY_FT, "data.source=folder",
               f"data.root={root}", f"train.out_dir={tmp_path / 'runs'}", f"train.run_name={name}", *extra])
    assert rc == 0
    return json.loads((tmp_path / "runs" / name / "eval.json").read_text())


# --- NYUv2 ----------------------------------------------------------------------------------------

N_NYU = 6
TRAIN_IDX, TEST_IDX = [1, 3, 5, 6], [2, 4]


def nyu_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upright (N,H,W,3) rgb with a bright top-left corner, depth in metres, raw labels 0..894."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 60, (N_NYU, H, W, 3), dtype=np.uint8)
    rgb[:, :3, :4] = 250  # top-left: 3 rows, 4 columns
    yy, xx = np.mgrid[:H, :W]
    depth = np.stack([0.5 + 0.25 * yy + 0.01 * xx + i for i in range(N_NYU)])  # grows downwards
    depth[:, H - 1, W - 1] = 0.0  # invalid
    labels = rng.integers(1, 895, (N_NYU, H, W)).astype(np.uint16)
    labels[:, 0, :] = 0  # first row unlabelled
    labels[:, 1, 0], labels[:, 1, 1] = 894, 1
    return rgb, depth, labels


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("nyu")
    rgb, depth, labels = nyu_arrays()
    with h5py.File(d / "nyu_depth_v2_labeled.mat", "w") as f:  # h5py's view of the v7.3 file: dims reversed
        f["images"] = rgb.transpose(0, 3, 2, 1)  # (N,3,W,H)
        f["depths"] = depth.transpose(0, 2, 1).astype(np.float32)  # (N,W,H)
        f["labels"] = labels.transpose(0, 2, 1)
    sio.savemat(d / "splits.mat", {"trainNdxs": np.array(TRAIN_IDX, float)[:, None],
                                   "testNdxs": np.array(TEST_IDX, float)[:, None]})
    map_class = np.random.default_rng(1).integers(1, 41, (1, 894)).astype(float)
    names = np.empty((1, 40), dtype=object)
    names[0, :] = [f"name{i}" for i in range(1, 41)]
    sio.savemat(d / "classMapping40.mat", {"mapClass": map_class, "className": names})
    return {"dir": d, "rgb": rgb, "depth": depth, "labels": labels, "map": map_class[0].astype(int)}


def nyu_args(nyu: dict, out: Path, *extra: str) -> list:
    d = nyu["dir"]
    return ["data", "prepare", "nyuv2", "--mat", d / "nyu_depth_v2_labeled.mat", "--splits", d / "splits.mat",
            "--mapping", d / "classMapping40.mat", "--out", out, "--no-progress", *extra]


def test_nyuv2_upright_splits_mapping_depth_and_resume(nyu, tmp_path, capsys):
    out = tmp_path / "nyu"
    rc, stdout, _ = run_cli(nyu_args(nyu, out), capsys)
    assert rc == 0
    assert "train 4 (the known size is 795: missing 791)" in stdout and "test 2 (the known size is 654" in stdout
    meta = read_meta(out)
    assert meta["png_scale"] == {"depth": 0.001}
    info = meta["prepare"]["nyuv2"]
    assert info["counts"] == {"train": 4, "test": 2} and info["semseg"]["classes"][:2] == ["name1", "name2"]
    assert (out / "semseg_classes.txt").read_text().splitlines()[39] == "name40"
    assert sorted(p.stem for p in (out / "train" / "rgb" / "all").iterdir()) == ["0001", "0003", "0005", "0006"]
    assert sorted(p.stem for p in (out / "test" / "depth" / "all").iterdir()) == ["0002", "0004"]

    ds = FolderDataset(out, "test", ["rgb", "depth", SEMSEG256])
    s = ds[1]  # image 4 (1-based) = index 3
    assert s["__key__"] == "all/0004" and tuple(s["rgb"].shape) == (3, H, W)  # upright 480x640 kind
    assert torch.equal(s["rgb"].permute(1, 2, 0), torch.from_numpy(nyu["rgb"][3]))
    assert int(s["rgb"][:, :3, :4].min()) == 250 and int(s["rgb"][:, 3:, 4:].max()) < 60  # bright top-left
    want = nyu["depth"][3]
    got = s["depth"][0].numpy()
    assert got[H - 1, W - 1] == 0.0  # invalid stays 0
    assert np.allclose(got[:-1], want[:-1], atol=6e-4)  # metres after png_scale (1 mm steps)
    raw = nyu["labels"][3].astype(int)
    sem = s["semseg"].numpy()
    assert (sem[0] == 255).all()  # unlabelled -> ignore
    assert sem[1, 0] == nyu["map"][893] - 1 and sem[1, 1] == nyu["map"][0] - 1
    lab = raw > 0
    assert np.array_equal(sem[lab], nyu["map"][raw[lab] - 1] - 1) and sem[lab].max() <= 39

    before = (out / "train" / "rgb" / "all" / "0001.png").stat().st_mtime_ns
    (out / "train" / "depth" / "all" / "0003.png").unlink()  # an interrupted run
    rc, stdout, _ = run_cli(nyu_args(nyu, out), capsys)
    assert rc == 0 and "wrote 1 sample(s), 5 already done" in stdout
    assert (out / "train" / "rgb" / "all" / "0001.png").stat().st_mtime_ns == before

    res = finetune(tmp_path, "folder-semseg.yaml", out, "nyu-seg", "model.head.embed_dim=16")
    assert res["num_samples"] == 2 and 0.0 <= res["metrics"]["miou"] <= 100.0
    res = finetune(tmp_path, "folder-depth.yaml", out, "nyu-depth", "model.head.feature_dim=8")
    assert res["num_samples"] == 2


def test_nyuv2_limit_and_shards(nyu, tmp_path, capsys):
    from multimae.data.shards import ShardDataset, count_samples

    out = tmp_path / "shards"
    rc, stdout, _ = run_cli(nyu_args(nyu, out, "--format", "shards", "--shard-size", "1", "--limit", "2"), capsys)
    assert rc == 0 and "train 2 of 795, test 2 of 654 samples; a --limit 2 subset" in stdout
    assert count_samples(str(out / "train-{000000..000001}.tar")) == 2
    samples = list(ShardDataset(str(out / "test-{000000..000001}.tar"), ["rgb", "depth", SEMSEG256], shuffle_buffer=0))
    assert [s["__key__"] for s in samples] == ["0002", "0004"]
    assert abs(float(samples[0]["depth"][0, 0, 0]) - nyu["depth"][1][0, 0]) < 6e-4  # png_scale in the shard
    rc, stdout, _ = run_cli(nyu_args(nyu, out, "--format", "shards", "--shard-size", "1", "--limit", "2"), capsys)
    assert "wrote 0 sample(s), 4 already done" in stdout


def test_nyuv2_wrong_inputs_name_the_file(nyu, tmp_path, capsys):
    d = nyu["dir"]
    v5 = tmp_path / "v5.mat"
    sio.savemat(v5, {"images": np.zeros((2, 2))})
    args = nyu_args(nyu, tmp_path / "o")
    cases = {
        ("--mat", v5): f"{v5}: is a MATLAB v5 file; expected the v7.3 (HDF5) nyu_depth_v2_labeled.mat",
        ("--splits", d / "nyu_depth_v2_labeled.mat"): "is a MATLAB v7.3 (HDF5) file; expected the v5 splits.mat",
        ("--mapping", d / "splits.mat"): f"{d / 'splits.mat'}: no 'mapClass' variable",
    }
    bad = tmp_path / "bad.mat"
    with h5py.File(bad, "w") as f:
        f["images"] = np.zeros((2, 640, 480), np.uint8)
        f["depths"] = f["labels"] = np.zeros((2, 640, 480))
    cases[("--mat", bad)] = f"{bad}: images has shape (2, 640, 480), expected (N,3,W,H)"
    for (flag, value), message in cases.items():
        a = list(args)
        a[a.index(flag) + 1] = value
        rc, _, err = run_cli(a, capsys)
        assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


# --- ADE20K ---------------------------------------------------------------------------------------

ADE_SIZES = {"training": [(20, 12), (12, 20), (16, 16)], "validation": [(12, 20), (20, 12)]}  # (w, h)


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    rng = np.random.default_rng(2)
    for sub, sizes in ADE_SIZES.items():
        for i, (w, h) in enumerate(sizes):
            name = f"ADE_{sub[:5]}_{i + 1:08d}"
            (src / "images" / sub).mkdir(parents=True, exist_ok=True)
            (src / "annotations" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / "images" / sub / f"{name}.jpg")
            lab = rng.integers(0, 151, (h, w)).astype(np.uint8)
            lab[0, 0], lab[0, 1], lab[0, 2] = 0, 1, 150
            Image.fromarray(lab).save(src / "annotations" / sub / f"{name}.png")
    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i},0.01,100,10,name{i};alias{i}" for i in range(1, 151)]
    (src / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    return src


def test_ade20k_sizes_mapping_names_and_finetune(ade, tmp_path, capsys):
    out = tmp_path / "ade"
    rc, stdout, _ = run_cli(["data", "prepare", "ade20k", "--src", ade, "--out", out, "--no-progress"], capsys)
    assert rc == 0 and "train 3 (the known size is 20210" in stdout and "val 2 (the known size is 2000" in stdout
    info = read_meta(out)["prepare"]["ade20k"]
    assert info["semseg"]["classes"][:2] == ["name1", "name2"] and len(info["semseg"]["classes"]) == 150
    ds = FolderDataset(out, "train", ["rgb", SEMSEG256])
    for i, (w, h) in enumerate(ADE_SIZES["training"]):
        s = ds[i]
        name = s["__key__"].split("/")[1]
        src_img = ade / "images" / "training" / f"{name}.jpg"
        assert (out / "train" / "rgb" / "all" / f"{name}.jpg").read_bytes() == src_img.read_bytes()  # unchanged
        assert tuple(s["rgb"].shape) == (3, h, w) and tuple(s["semseg"].shape) == (h, w)  # portrait / landscape
        raw = np.asarray(Image.open(ade / "annotations" / "training" / f"{name}.png")).astype(int)
        want = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(s["semseg"].numpy(), want) and s["semseg"][0, :3].tolist() == [255, 0, 149]
    res = finetune(tmp_path, "folder-semseg.yaml", out, "ade-seg", "model.head.embed_dim=16",
                   "model.head.num_classes=150", "data.eval_split=val")
    assert res["num_samples"] == 2


def test_ade20k_tab_separated_object_info(tmp_path):
    from multimae.data import DataError
    from multimae.data.prepare.ade20k import class_names

    txt = tmp_path / "objectInfo150.txt"  # as in the download: tab-separated
    txt.write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i}\t0.1\t1\t1\twall{i};walls\n" for i in range(150, 0, -1)))
    names = class_names(tmp_path)
    assert names[0] == "wall1" and names[149] == "wall150"
    txt.write_text("Idx\tName\n1\twall\n")
    with pytest.raises(DataError, match=f"{txt}: expected Idx 1..150"):
        class_names(tmp_path)


def test_ade20k_missing_annotation_names_it(ade, tmp_path, capsys):
    import shutil

    src = tmp_path / "ADEChallengeData2016"
    shutil.copytree(ade, src)
    gone = src / "annotations" / "validation" / "ADE_valid_00000002.png"
    gone.unlink()
    rc, _, err = run_cli(["data", "prepare", "ade20k", "--src", src, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and f"{gone}: missing annotation" in err and err.count("\n") == 1


# --- ImageNet -------------------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n02102040"]
VAL = ["n02102040", "n01440764", "n01443537", "n02102040"]  # labels of ILSVRC2012_val_0000000{1..4}
ILSVRC_ID = {"n01440764": 449, "n01443537": 1, "n02102040": 1000}  # ids are not in wnid order


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(3)
    for w in WNIDS:
        (src / "train" / w).mkdir(parents=True)
        for k in range(2):
            (src / "train" / w / f"{w}_{k}.JPEG").write_bytes(_jpeg(rng))
    (src / "val").mkdir()
    for i in range(1, 5):
        (src / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(rng))
    with open(src / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i, wnid in enumerate(VAL, start=1):
            w.writerow([f"ILSVRC2012_val_{i:08d}", f"{wnid} 1 2 10 12 {wnid} 3 4 5 6"])
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ILSVRC_ID[w]}\n" for w in VAL))
    others = iter(f"n9{i:07d}" for i in range(2000))
    recs = []
    for i in range(1, 1001):
        wnid = next((w for w, j in ILSVRC_ID.items() if j == i), None) or next(others)
        recs.append((float(i), wnid, f"words of {wnid}", 0.0))
    recs += [(1001.0, "n00001740", "entity", 3.0), (1002.0, "n00002137", "abstraction", 2.0)]  # inner synsets
    syn = np.array(recs, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    sio.savemat(src / "meta.mat", {"synsets": syn[:, None]})
    return src


@pytest.mark.parametrize("labels", ["LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt"])
def test_imagenet_flat_val_with_each_ground_truth(imagenet, tmp_path, capsys, labels):
    out = tmp_path / "in1k"
    extra = ["--devkit-meta", imagenet / "meta.mat"] if labels.endswith(".txt") else []
    rc, stdout, _ = run_cli(["data", "prepare", "imagenet", "--src", imagenet, "--val-labels", imagenet / labels,
                             *extra, "--out", out, "--no-progress"], capsys)
    assert rc == 0 and "train 6 (the known size is 1281167" in stdout and "val 4 (the known size is 50000" in stdout
    assert "image bytes copied" in stdout and "sorted wnids" in stdout
    assert read_meta(out)["classes"] == sorted(WNIDS)
    for i, wnid in enumerate(VAL, start=1):
        f = out / "val" / "rgb" / wnid / f"ILSVRC2012_val_{i:08d}.jpeg"
        assert f.read_bytes() == (imagenet / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").read_bytes()
    ds = FolderDataset(out, "val", ["rgb", "label"])
    assert [int(ds[i]["label"]) for i in range(len(ds))] == sorted(sorted(WNIDS).index(w) for w in VAL)
    if labels.endswith(".txt"):
        assert read_meta(out)["prepare"]["imagenet"]["classification"]["names"][0] == "words of n01440764"
        res = finetune(tmp_path, "folder-cls.yaml", out, "in1k", "model.head.num_classes=3", "aug.mixup=0",
                       "aug.cutmix=0", "aug.randaugment=false", "data.crop_scale=[0.5,1.0]")
        assert res["num_samples"] == 4


def test_imagenet_limit_takes_classes_in_turn_and_links(imagenet, tmp_path, capsys):
    out = tmp_path / "in1k"
    rc, stdout, _ = run_cli(["data", "prepare", "imagenet", "--src", imagenet, "--val-labels",
                             imagenet / "LOC_val_solution.csv", "--out", out, "--limit", "3", "--link", "symlink",
                             "--no-progress"], capsys)
    assert rc == 0 and "a --limit 3 subset" in stdout and "symlinked" in stdout
    assert sorted(p.name for p in (out / "train" / "rgb").iterdir()) == sorted(WNIDS)  # one per class
    assert all(p.is_symlink() for p in (out / "train" / "rgb").rglob("*.jpeg"))


def test_imagenet_wrong_inputs_name_the_file(imagenet, tmp_path, capsys):
    base = ["data", "prepare", "imagenet", "--src", imagenet, "--out", tmp_path / "o"]
    rc, _, err = run_cli(base, capsys)
    assert rc == 2 and f"{imagenet / 'val'}: flat validation images need --val-labels" in err
    gt = imagenet / "ILSVRC2012_validation_ground_truth.txt"
    rc, _, err = run_cli(base + ["--val-labels", gt], capsys)
    assert rc == 2 and f"{gt}: the ILSVRC2012 ids need the devkit's meta.mat" in err
    bad = tmp_path / "LOC_val_solution.csv"
    bad.write_text("ImageId,Label\nILSVRC2012_val_00000001,n01440764\n")
    rc, _, err = run_cli(base + ["--val-labels", bad], capsys)
    assert rc == 2 and f"{bad}: expected the columns ImageId,PredictionString" in err and err.count("\n") == 1


# --- COCO captions --------------------------------------------------------------------------------

COCO = {1: ["A man riding a horse.", "Someone on\na horse "], 7: ["Two cats.", "Cats on a sofa.", "A sofa."],
        3: ["A red bus."]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("coco")
    (d / "train2017").mkdir()
    rng = np.random.default_rng(4)
    images, anns, ann_id = [], [], 100
    for image_id, caps in COCO.items():
        name = f"{image_id:012d}.jpg"
        (d / "train2017" / name).write_bytes(_jpeg(rng))
        images.append({"id": image_id, "file_name": name, "height": 20, "width": 24})
        for c in caps:
            anns.append({"image_id": image_id, "id": ann_id, "caption": c})
            ann_id += 1
    images.append({"id": 99, "file_name": "000000000099.jpg"})  # no caption: left out
    (d / "captions_train2017.json").write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return {"images": d / "train2017", "json": d / "captions_train2017.json"}


def coco_args(coco: dict, out: Path, *extra) -> list:
    return ["data", "prepare", "coco-captions", "--images", coco["images"], "--captions", coco["json"],
            "--split", "train", "--out", out, "--no-progress", *extra]


def test_coco_captions_per_caption_table_and_m3ae_pretrain(coco, tmp_path, capsys):
    from multimae.data.text import CaptionTable

    out = tmp_path / "coco"
    rc, stdout, _ = run_cli(coco_args(coco, out), capsys)
    assert rc == 0 and "train 3 (the known size is 118287" in stdout and "train 6 (the known size is 591753" in stdout
    table = out / "captions_train.tsv"
    ds = CaptionTable(table)
    assert len(ds) == 6
    assert [ds.load(i)["caption"] for i in range(6)] == [
        "A man riding a horse.", "Someone on a horse", "A red bus.", "Two cats.", "Cats on a sofa.", "A sofa."]
    assert tuple(ds[0]["rgb"].shape) == (3, 20, 24)
    rc = main(["pretrain", "--config", "configs/pretrain/synthetic-m3ae-tiny.yaml", "model.preset=nano",
               "model.depth=1", "model.image_size=16", "model.patch_size=8", "data.image_size=16",
               "model.decoder_depth=1", "model.decoder_dim=32", "data.source=captions", f"data.root={table}",
               "data.num_workers=0", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
               "train.resume=null", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=m3ae"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "m3ae" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2


def test_coco_captions_per_image_draws_one_per_epoch(coco, tmp_path, capsys):
    from multimae.data.text import CaptionTable

    out = tmp_path / "coco"
    rc, stdout, _ = run_cli(coco_args(coco, out, "--per-sample", "image", "--link", "hardlink"), capsys)
    assert rc == 0 and "one per image" in stdout
    ds = CaptionTable(out / "captions_train.tsv", seed=5)
    assert len(ds) == 3 and ds.multi
    cats = 2  # 000000000007: three captions
    draws = [ds.item_at_epoch(cats, e)["caption"] for e in range(12)]
    assert set(draws) == set(COCO[7])  # every caption is drawn over the epochs
    assert draws == [CaptionTable(out / "captions_train.tsv", seed=5).item_at_epoch(cats, e)["caption"]
                     for e in range(12)]  # deterministic (resumable)
    assert ds.item_at_epoch(1, 3)["caption"] == "A red bus."
    from multimae.data.loader import SeededAugment  # the training loader asks for the epoch's draw

    aug = SeededAugment(ds, lambda s, generator: s, seed=0)
    assert [aug[(e, 0, cats)]["caption"] for e in range(12)] == draws
    assert (out / "train" / "rgb" / "all" / "000000000001.jpg").stat().st_ino == \
        (coco["images"] / "000000000001.jpg").stat().st_ino


def test_coco_captions_shards_and_wrong_inputs(coco, tmp_path, capsys):
    from multimae.data.shards import ShardDataset

    out = tmp_path / "shards"
    rc, stdout, _ = run_cli(coco_args(coco, out, "--format", "shards", "--limit", "2"), capsys)
    assert rc == 0 and "a --limit 2 subset" in stdout
    caption = modalities.get("caption") if "caption" in modalities.registered() else {"name": "caption", "kind": "text"}
    samples = list(ShardDataset(str(out / "train-000000.tar"), ["rgb", caption], shuffle_buffer=0))
    assert [s["caption"] for s in samples] == ["A man riding a horse.", "Someone on a horse", "A red bus."]
    rc, _, err = run_cli(coco_args(coco, tmp_path / "x", "--format", "shards", "--per-sample", "image"), capsys)
    assert rc == 2 and "--per-sample image" in err
    bad = tmp_path / "instances_train2017.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    a = coco_args(coco, tmp_path / "y")
    a[a.index("--captions") + 1] = bad
    rc, _, err = run_cli(a, capsys)
    assert rc == 2 and f"{bad}: annotations[0] lacks 'image_id' / a 'caption' string" in err and err.count("\n") == 1


def _coco_json(path: Path, names: list[str]) -> Path:
    images = [{"id": i, "file_name": n} for i, n in enumerate(names, start=1)]
    anns = [{"image_id": i, "id": 10 + i, "caption": f"caption of {n}"} for i, n in enumerate(names, start=1)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_coco_captions_paths_stay_inside_the_image_directory(tmp_path, capsys):
    images = tmp_path / "d" / "train2017"
    images.mkdir(parents=True)
    secret = tmp_path / "d" / "secret.jpg"
    secret.write_bytes(_jpeg(np.random.default_rng(0)))
    (images / "link.jpg").symlink_to(secret)
    (images / "text.jpg").write_text("not an image at all")
    cases = {"../secret.jpg": "no absolute path, no '..'", str(secret): "no absolute path, no '..'",
             "a/../../secret.jpg": "no absolute path, no '..'", "link.jpg": "outside",
             "text.jpg": "truncated or not an image"}
    for name, why in cases.items():
        out = tmp_path / "out"
        args = ["data", "prepare", "coco-captions", "--images", images, "--captions",
                _coco_json(tmp_path / "c.json", [name]), "--out", out, "--no-progress"]
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and why in err and "image 1" in err and err.count("\n") == 1, (name, err)
        assert not list(out.rglob("*.jpg"))  # nothing copied


def test_coco_captions_same_names_in_two_folders_stay_two_images(tmp_path, capsys):
    from multimae.data.text import CaptionTable

    images = tmp_path / "train2017"
    rng = np.random.default_rng(1)
    for sub in ("sub1", "sub2"):
        (images / sub).mkdir(parents=True)
        (images / sub / "dup.jpg").write_bytes(_jpeg(rng))
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(["data", "prepare", "coco-captions", "--images", images, "--captions",
                             _coco_json(tmp_path / "c.json", ["sub1/dup.jpg", "sub2/dup.jpg"]), "--out", out,
                             "--no-progress"], capsys)
    assert rc == 0 and "train 2 " in stdout
    for sub in ("sub1", "sub2"):
        written = out / "train" / "rgb" / "all" / f"{sub}__dup.jpg"
        assert written.read_bytes() == (images / sub / "dup.jpg").read_bytes()
    ds = CaptionTable(out / "captions_train.tsv")
    assert sorted(ds.load(i)["caption"] for i in range(len(ds))) == ["caption of sub1/dup.jpg",
                                                                     "caption of sub2/dup.jpg"]
    # one file named twice (two image ids) would be one output sample: refused, naming both
    rc, _, err = run_cli(["data", "prepare", "coco-captions", "--images", images, "--captions",
                          _coco_json(tmp_path / "c2.json", ["sub1/dup.jpg", "sub1/dup.jpg"]), "--out",
                          tmp_path / "o2", "--no-progress"], capsys)
    assert rc == 2 and "would both be written as sample train/all/sub1__dup" in err


def test_imagenet_refuses_non_images_and_colliding_names(tmp_path, capsys):
    src = tmp_path / "in"
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        (src / split / "n01440764").mkdir(parents=True)
        (src / split / "n01440764" / "a.JPEG").write_bytes(_jpeg(rng))
    (src / "train" / "n01440764" / "a.jpeg").write_bytes(_jpeg(rng))
    rc, _, err = run_cli(["data", "prepare", "imagenet", "--src", src, "--out", tmp_path / "o", "--no-progress"],
                         capsys)
    assert rc == 2 and "would both be written as sample train/n01440764/a" in err
    (src / "train" / "n01440764" / "a.jpeg").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "train" / "n01440764" / "a.jpeg").rename(src / "train" / "n01440764" / "b.jpeg")
    rc, _, err = run_cli(["data", "prepare", "imagenet", "--src", src, "--out", tmp_path / "o", "--no-progress"],
                         capsys)
    assert rc == 2 and "b.jpeg" in err and "not an image" in err and err.count("\n") == 1
