"""Image-text data: caption tables, unpaired rows (data.missing), TextCollator."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from multimae.data.errors import DataError
from multimae.data.text import CaptionTable, TextCollator
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


# --- unpaired rows: data.missing --------------------------------------------------------------------------------


def test_caption_table_unpaired_rows_follow_data_missing(tmp_path):
    """A row with an empty image cell or an empty caption is unpaired data: kept as a text-only /
    image-only sample under missing=allow (the batch marks the other modality absent), left out
    and counted under skip, an error naming the line under error."""
    write_images(tmp_path, 2)
    rows = ["img/im0.jpg,a red cube", ",only a caption", "img/im1.jpg,", "img/im1.jpg,a blue ball"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    allow = CaptionTable(tmp_path / "t.csv", missing="allow")
    assert len(allow) == 4
    assert set(allow[1]) == {"caption", "__key__"} and allow[1]["caption"] == "only a caption"
    assert set(allow[2]) == {"rgb", "__key__"} and allow[2]["rgb"].shape == (3, 12, 16)
    enc = TextEncoder(train_wordpiece(["a red cube", "only a caption", "a blue ball"]), max_len=6)
    from multimae.data.transforms import PairedTransform

    tf = PairedTransform(["rgb", "caption"], 8, train=False, allow_missing=True)
    b = TextCollator(enc, image_shapes={"rgb": (3, 8, 8)})([tf(allow[i]) for i in range(4)])
    assert b.present["rgb"].tolist() == [True, False, True, True]
    assert b.present["caption"].tolist() == [True, True, False, True]
    skip = CaptionTable(tmp_path / "t.csv", missing="skip")
    assert len(skip) == 2 and skip.skipped == 2
    strict = CaptionTable(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"t.csv line 2: no image \(data.missing=error"):
        strict.load(1)
    with pytest.raises(DataError, match=r"t.csv line 3: empty caption \(image img/im1.jpg\)"):
        strict.load(2)


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


def test_a_table_whose_every_row_is_skipped_says_so(tmp_path) -> None:
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\na.png,\nb.png,\n")  # every caption empty: skipped under missing=skip
    ds = CaptionTable(table, missing="skip")
    with pytest.raises(DataError, match=r"captions\.csv: every one of the 0 rows is bad"):
        ds[0]
