"""Image-text data: caption tables, img2dataset shards, unpaired sources, MixedStream, TextCollator."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from multimae.data.errors import DataError
from multimae.data.text import CaptionTable, ImageOnly, ImageTextShards, MixedStream, TextCollator, TextOnly
from multimae.data.tokenizers import TextEncoder, train_wordpiece
from multimae.core.masking import ratio_plan


def jpg(seed: int, size: int = 12) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_images(root, n=3):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "img" / f"im{i}.jpg").write_bytes(jpg(i))


# --- CaptionTable --------------------------------------------------------------------------------------------


def test_caption_table_csv_with_header_and_tsv_without(tmp_path):
    write_images(tmp_path)
    (tmp_path / "caps.csv").write_text('filepath,title\nimg/im0.jpg,"a red cube, on a table"\nimg/im1.jpg,a cat\n')
    ds = CaptionTable(tmp_path / "caps.csv")
    assert len(ds) == 2
    s = ds[0]
    assert s["rgb"].dtype == torch.uint8 and s["rgb"].shape == (3, 12, 16)
    assert s["caption"] == "a red cube, on a table" and s["__key__"] == "im0-l2"
    named = CaptionTable(tmp_path / "caps.csv", image_col="filepath", caption_col="title")
    assert named[1]["caption"] == "a cat"
    (tmp_path / "caps.txt").write_text(f"{tmp_path}/img/im2.jpg\ta, tab-separated caption\nimg/im1.jpg\tdog\n")
    tsv = CaptionTable(tmp_path / "caps.txt", image_root=tmp_path)  # sniffed: tab; no header; absolute path ok
    assert tsv.delimiter == "\t" and len(tsv) == 2 and tsv[0]["caption"] == "a, tab-separated caption"
    with pytest.raises(DataError, match="no column named 'image'"):
        CaptionTable(tmp_path / "caps.csv", image_col="image")


def test_caption_table_errors_name_file_and_line(tmp_path):
    write_images(tmp_path, 1)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rows = ["img/im0.jpg,fine", "img/missing.jpg,a caption", "bad.jpg,a caption", "img/im0.jpg,   ", "onlyonecolumn.jpg"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"t.csv line 5: 1 column\(s\), expected at least 2"):
        CaptionTable(tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("\n".join(rows[:4]) + "\n")
    ds = CaptionTable(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"t.csv line 2: image file .*img/missing.jpg unreadable"):
        ds.load(1)
    with pytest.raises(DataError, match=r"t.csv line 3: image file .*bad.jpg: truncated or not an image"):
        ds.load(2)
    with pytest.raises(DataError, match=r"t.csv line 4: empty caption \(image img/im0.jpg\)"):
        ds.load(3)
    skip = CaptionTable(tmp_path / "t.csv", on_error="skip")
    assert skip[1]["__key__"] == "im0-l1"  # rows 2..4 are bad: skipped (wrapping around), counted
    assert skip.skipped == 3
    with pytest.raises(DataError, match="not found"):
        CaptionTable(tmp_path / "nope.csv")


# --- img2dataset shards -----------------------------------------------------------------------------------------


def test_image_text_shards(tmp_path):
    path = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(path) as w:
        w.write({"__key__": "000000000", "jpg": jpg(0), "txt": "a red cube".encode(),
                 "json": json.dumps({"caption": "ignored", "url": "http://x"}).encode()})
        w.write({"__key__": "000000001", "jpg": jpg(1), "json": json.dumps({"caption": "from json"}).encode()})
        w.write({"__key__": "000000002", "jpg": jpg(2), "txt": b"  "})
        w.write({"__key__": "000000003", "txt": b"no image"})
    ds = ImageTextShards(path, shuffle_buffer=0, on_error="skip")
    got = list(ds)
    assert [s["caption"] for s in got] == ["a red cube", "from json"]
    assert got[0]["rgb"].shape == (3, 12, 16) and got[0]["rgb"].dtype == torch.uint8
    assert set(got[0]) == {"rgb", "caption", "__key__"} and ds.skipped == 2
    strict = ImageTextShards(path, shuffle_buffer=0)
    with pytest.raises(DataError, match=r"sample 000000002 in shard .*shard-000000.tar: empty caption"):
        list(strict)


# --- unpaired sources and mixing ----------------------------------------------------------------------------------


def paired(n=10):
    return [{"rgb": torch.full((3, 4, 4), float(i)), "caption": f"caption {i}", "__key__": f"p{i}"} for i in range(n)]


def test_unpaired_sources(tmp_path):
    img = ImageOnly(paired(3))
    assert len(img) == 3 and "caption" not in img[0] and "rgb" in img[0]
    assert [s["__key__"] for s in img] == ["p0", "p1", "p2"]
    txt = TextOnly(["a", "b"])
    assert len(txt) == 2 and txt[1] == {"caption": "b", "__key__": "text-00000001"}
    (tmp_path / "c.txt").write_text("one\n\ntwo\nthree\n")
    assert [s["caption"] for s in TextOnly(tmp_path / "c.txt")] == ["one", "two", "three"]
    assert [s["caption"] for s in TextOnly(tmp_path / "c.txt", rank=1, world_size=2)] == ["two"]


def test_mixed_stream_proportions_and_determinism(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"text {i}" for i in range(7)))
    sources = {"paired": paired(10), "image": ImageOnly(paired(6)), "text": TextOnly(tmp_path / "c.txt")}
    weights = {"paired": 5, "image": 3, "text": 2}
    n = 4000
    samples = list(MixedStream(sources, weights, seed=1, samples_per_rank=n))
    counts = Counter(s["__source__"] for s in samples)
    for name, w in weights.items():
        assert abs(counts[name] / n - w / 10) < 0.03, counts
    for s in samples:
        src = s["__source__"]
        assert ("rgb" in s) == (src != "text") and ("caption" in s) == (src != "image")
    # map-style sources are covered evenly: every pass visits each sample once
    keys = Counter(s["__key__"] for s in samples if s["__source__"] == "paired")
    assert max(keys.values()) - min(keys.values()) <= 1
    again = list(MixedStream(sources, weights, seed=1, samples_per_rank=n))
    assert [s["__key__"] for s in again] == [s["__key__"] for s in samples]
    other = list(MixedStream(sources, weights, seed=2, samples_per_rank=n))
    assert [s["__key__"] for s in other] != [s["__key__"] for s in samples]
    stream = MixedStream(sources, weights, seed=1, samples_per_rank=50)
    e0, e1 = [s["__key__"] for s in stream], [s["__key__"] for s in stream]  # next epoch: new order
    assert e0 != e1 and len(e0) == len(stream) == 50
    stream.set_epoch(0)
    assert [s["__key__"] for s in stream] == e0
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        MixedStream(sources, {"paired": 1, "image": 1})
    with pytest.raises(DataError, match="source 'empty' is empty"):
        MixedStream({"empty": []}, {"empty": 1.0})


# --- collation ------------------------------------------------------------------------------------------------------


def test_text_collator_present_flags_and_masking():
    enc = TextEncoder(train_wordpiece(["a red cube", "a blue sphere"]), max_len=6)
    collate = TextCollator(enc)
    samples = [{"rgb": torch.ones(3, 8, 8), "caption": "a red cube", "__key__": "p", "__source__": "paired"},
               {"rgb": torch.full((3, 8, 8), 2.0), "__key__": "i", "__source__": "image"},
               {"caption": "a blue sphere", "__key__": "t", "__source__": "text"}]
    b = collate(samples)
    assert b["caption"].shape == (3, 6) and b.pad["caption"].shape == (3, 6)
    assert b.present["caption"].tolist() == [True, False, True] and b.present["rgb"].tolist() == [True, True, False]
    assert bool(b.pad["caption"][1].all()) and not bool(b.pad["caption"][0, :3].any())
    assert b["rgb"].shape == (3, 3, 8, 8) and float(b["rgb"][2].abs().sum()) == 0.0 and float(b["rgb"][1, 0, 0, 0]) == 2
    assert b.extra["__key__"] == ["p", "i", "t"] and b.extra["__source__"] == ["paired", "image", "text"]
    # an absent modality gets no visible token
    plan = ratio_plan({"rgb": 4, "caption": 6}, 3, {"rgb": 0.5, "caption": 0.5}, torch.Generator().manual_seed(0),
                      valid={"caption": ~b.pad["caption"]}, present={"rgb": b.present["rgb"], "caption": b.present["caption"]})
    assert bool(plan.masks["rgb"][2].all()) and bool(plan.masks["caption"][1].all())
    assert not bool((~plan.masks["caption"] & b.pad["caption"]).any())
    # a batch without any image: zeros of a declared shape, or no image key at all
    text_only = [samples[2], samples[2]]
    assert "rgb" not in collate(text_only)
    b2 = TextCollator(enc, image_shapes={"rgb": (3, 8, 8)})(text_only)
    assert b2["rgb"].shape == (2, 3, 8, 8) and not bool(b2.present["rgb"].any())
    with pytest.raises(DataError, match=r"cannot collate 'rgb' of sample i: \(3, 4, 4\), expected"):
        collate([samples[0], {"rgb": torch.ones(3, 4, 4), "__key__": "i"}])
    with pytest.raises(DataError, match="cannot collate 'label'"):
        collate([dict(samples[0], label=torch.tensor(1)), samples[1]])
