"""``multimae data`` subcommands: thin wrappers that write data the datasets read back."""
from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_testutils import specs, write_png

from multimae.cli.main import main
from multimae.data.folder import FolderDataset
from multimae.data.shards import ShardDataset, count_samples
from multimae.data.synthetic import LABEL_CLASSES


def test_synthetic_folder_then_shards_then_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "f"
    assert main(["data", "synthetic", "--out", str(root), "--num", "5", "--size", "16", "--seed", "2",
                 "--format", "folder"]) == 0
    ds = FolderDataset(root, "train", specs())
    assert len(ds) == 5 and ds.classes == LABEL_CLASSES
    pattern = str(tmp_path / "s" / "train-%06d.tar")
    assert main(["data", "shards", "--folder", str(root), "--split", "train", "--modalities",
                 "rgb,depth,semseg,caption", "--out", pattern, "--shard-size", "2", "--num-classes", "6"]) == 0
    paths = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    assert len(paths) == 3 and count_samples(paths) == 5
    assert len(list(ShardDataset(paths, specs(["rgb", "depth", "semseg", "caption"]) + ["label"]))) == 5
    assert main(["data", "check", "--folder", str(root), "--modalities", "rgb,depth,semseg", "--num-classes", "6"]) == 0
    write_png(next((root / "train" / "semseg").rglob("*.png")), np.full((16, 16), 9, np.uint8))
    assert main(["data", "check", "--folder", str(root), "--modalities", "rgb,depth,semseg", "--num-classes", "6"]) == 1
    assert "class id 9" in capsys.readouterr().err


def test_synthetic_shards(tmp_path: Path) -> None:
    assert main(["data", "synthetic", "--out", str(tmp_path), "--num", "5", "--size", "16", "--format", "shards",
                 "--shard-size", "2", "--split", "val"]) == 0
    paths = sorted(str(p) for p in tmp_path.glob("val-*.tar"))
    assert len(paths) == 3 and count_samples(paths) == 5


def test_data_bench_reports_rate_and_cores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synthetic", "--out", str(tmp_path), "--num", "6", "--size", "40", "--format", "shards",
                 "--shard-size", "3"]) == 0
    tars = sorted(tmp_path.glob("train-*.tar"))
    assert len(tars) == 2 and any(".depth.zst" in n for n in tarfile.open(tars[0]).getnames())  # compact by default
    capsys.readouterr()
    urls = ",".join(str(t) for t in tars)
    assert main(["data", "bench", "--source", "shards", "--urls", urls, "--num", "8", "--image-size", "32",
                 "--gpu-rate", "1000"]) == 0
    out = capsys.readouterr().out
    rate = float(re.search(r"decode \+ transforms: ([\d.]+) samples per CPU second", out).group(1))
    cores = float(re.search(r"one GPU at 1000 images/s needs ([\d.]+) cores", out).group(1))
    assert rate > 0 and cores == pytest.approx(1000 / rate, rel=0.06, abs=0.051)  # printed to 0.1
    assert main(["data", "bench", "--source", "folder", "--urls", urls]) == 2
    assert "--source folder needs --root" in capsys.readouterr().err
    assert main(["data", "bench", "--source", "shards", "--urls", str(tmp_path / "missing.tar"), "--num", "2"]) == 2
