"""Incomplete datasets (data.missing=error|skip|allow): a folder where half the samples lack depth
and a third lack semseg, and shards with missing keys. Absent modalities are marked in
Batch.present, filled with zeros of the right shape, and get no visible token in the mask plan."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from multimae.cli.main import main
from multimae.data import DataError
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.folder import FolderDataset
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, write_shards
from multimae.data.synthetic import SyntheticScenes
from data_testutils import lacks_depth, lacks_semseg, partial_folder  # tests/helpers
from multimae.core.modalities import resolve

N = 12
SEMSEG6 = {"semseg": {"num_classes": 6}}


def specs():
    return resolve(["rgb", "depth", "semseg"], SEMSEG6)


def spec_of(names=("rgb", "depth", "semseg")) -> BatchSpec:
    sp = tuple(resolve(list(names), SEMSEG6))
    return BatchSpec(sp, sp, patch_size=8, image_size=32)


def test_error_names_the_file_and_the_modality(tmp_path):
    root = partial_folder(tmp_path / "d")
    with pytest.raises(DataError, match=r"sample all/00000000: missing depth file .*train/depth/all/00000000\.<png"):
        FolderDataset(root, "train", specs())  # the default: today's behaviour
    with pytest.raises(DataError, match="data.missing=error"):
        FolderDataset(root, "train", specs(), missing="error")
    with pytest.raises(ValueError, match="data.missing must be"):
        FolderDataset(root, "train", specs(), missing="maybe")


def test_skip_drops_and_counts(tmp_path, caplog):
    root = partial_folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        ds = FolderDataset(root, "train", specs(), missing="skip")
    complete = [i for i in range(N) if not lacks_depth(i) and not lacks_semseg(i)]
    assert len(ds) == len(complete) == 4 and ds.skipped == N - 4
    assert [ds.key(i) for i in range(len(ds))] == [f"all/{i:08d}" for i in complete]
    notes = [r.getMessage() for r in caplog.records if "lacking a modality file" in r.getMessage()]
    assert len(notes) == 1 and "left out 8 of 12" in notes[0] and "depth 6" in notes[0] and "semseg 4" in notes[0]
    assert ds.coverage == {"rgb": 12, "depth": 6, "semseg": 8} and ds.listed == 12


def test_allow_keeps_every_sample_and_the_batch_marks_absent_ones(tmp_path):
    root = partial_folder(tmp_path / "d")
    ds = FolderDataset(root, "train", specs(), missing="allow")
    assert len(ds) == N and ds.skipped == 0
    s0, s1 = ds[0], ds[1]
    assert set(s0) == {"rgb", "__key__"} and set(s1) == {"rgb", "depth", "semseg", "__key__"}
    data = DataConfig(source="folder", root=str(root), image_size=32, num_workers=0, missing="allow")
    mask = MaskConfig(num_visible=8)
    loader, position = build_loader(data, mask, spec_of(), seed=0, batch_size=4)
    position.set_epoch(0)
    seen = 0
    for batch, plan in loader:
        keys = [int(k.rsplit("/", 1)[1]) for k in batch.extra["__key__"]]
        assert batch.present["depth"].tolist() == [not lacks_depth(i) for i in keys]
        assert batch.present["semseg"].tolist() == [not lacks_semseg(i) for i in keys]
        assert bool(batch.present["rgb"].all())
        assert batch["depth"].shape == (4, 1, 32, 32) and batch["semseg"].shape == (4, 8, 8)
        assert batch["semseg"].dtype == torch.int64
        for key in ("depth", "semseg"):
            gone = ~batch.present[key]
            assert float(batch[key][gone].abs().sum()) == 0.0  # zeros in their place
            # no visible token falls on an absent modality: the whole budget goes to the ones present
            assert bool(plan.masks[key][gone].all())
        visible = sum((~m).sum(1) for m in plan.masks.values())
        assert visible.tolist() == [8] * 4
        seen += batch.size
    assert seen == N


def test_allow_batch_where_no_sample_has_a_modality(tmp_path):
    """A batch where none of the samples has depth still holds a depth tensor of the right shape
    (zeros, all absent): every batch has the same structure."""
    root = partial_folder(tmp_path / "d")
    import shutil

    shutil.rmtree(root / "train" / "depth")
    ds = FolderDataset(root, "train", specs(), missing="allow")
    assert ds.coverage["depth"] == 0 and len(ds) == N
    data = DataConfig(source="folder", root=str(root), image_size=32, num_workers=0, missing="allow")
    loader, position = build_loader(data, MaskConfig(num_visible=8), spec_of(), seed=0, batch_size=4)
    position.set_epoch(0)
    batch, plan = next(iter(loader))
    assert batch["depth"].shape == (4, 1, 32, 32) and not bool(batch.present["depth"].any())
    assert bool(plan.masks["depth"].all())


def _partial_shards(tmp_path: Path) -> list[str]:
    ds = SyntheticScenes(N, image_size=32, seed=3, modalities=["rgb", "depth", "semseg"])
    samples = []
    for i in range(N):
        s = dict(ds[i])
        if lacks_depth(i):
            del s["depth"]
        if lacks_semseg(i):
            del s["semseg"]
        samples.append(s)
    return write_shards(samples, str(tmp_path / "shard-%06d.tar"), max_count=6)


def test_shards_with_missing_keys(tmp_path):
    urls = _partial_shards(tmp_path)
    strict = ShardDataset(urls, specs(), shuffle_buffer=0)
    with pytest.raises(DataError, match=r"sample 00000000 in shard .*shard-000000.tar: missing key 'depth\.png'"):
        list(strict)
    skip = ShardDataset(urls, specs(), shuffle_buffer=0, missing="skip")
    got = list(skip)
    assert [s["__key__"] for s in got] == [f"{i:08d}" for i in range(N) if not lacks_depth(i) and not lacks_semseg(i)]
    assert skip.skipped == 8
    # a resume passes over positions before decoding: lacking samples take none, so it is exact
    keys = [s["__key__"] for s in skip.samples(0, count=4)]
    assert [s["__key__"] for s in skip.samples(0, count=4, skip=2)] == keys[2:]
    allow = ShardDataset(urls, specs(), shuffle_buffer=0, missing="allow")
    got = list(allow)
    assert len(got) == N
    assert [("depth" in s, "semseg" in s) for s in got] == [(not lacks_depth(i), not lacks_semseg(i)) for i in range(N)]
    # through the training loader: the same presence flags, and a skip-resume counts the same positions
    data = DataConfig(source="shards", urls=",".join(urls), image_size=32, num_workers=0, num_samples=N,
                      shuffle_buffer=0, missing="allow")
    loader, position = build_loader(data, MaskConfig(num_visible=8), spec_of(), seed=0, batch_size=4)
    position.set_epoch(0)
    flags = []
    for batch, plan in loader:
        flags += batch.present["depth"].tolist()
        assert bool(plan.masks["depth"][~batch.present["depth"]].all())
    assert sorted(flags) == sorted(not lacks_depth(i) for i in range(N))


def test_data_check_reports_coverage(tmp_path, capsys):
    root = partial_folder(tmp_path / "d")
    assert main(["data", "check", "--folder", str(root), "--modalities", "rgb,depth,semseg", "--num-classes", "6",
                 "--missing", "allow"]) == 0
    out = capsys.readouterr().out
    assert "rgb: 12 of 12 (100.0%)" in out and "depth: 6 of 12 (50.0%)" in out and "semseg: 8 of 12 (66.7%)" in out
    assert "12 indexed sample(s), 0 bad" in out
    # the default (error): the missing files are the problems, named, and coverage still shown
    assert main(["data", "check", "--folder", str(root), "--modalities", "rgb,depth,semseg",
                 "--num-classes", "6"]) == 1
    captured = capsys.readouterr()
    assert "depth: 6 of 12 (50.0%)" in captured.out and "missing depth file" in captured.err
