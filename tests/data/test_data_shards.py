"""WebDataset shards: exact 16-bit round trip, rank/worker splitting, equal steps, bad shards."""
from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutils import official_folder, specs
from PIL import Image
from torch.utils.data import DataLoader

from multimae.data import DataError
from multimae.data.codecs import OFFICIAL_PNG_SCALE, png16_exact
from multimae.data.folder import FolderDataset
from multimae.data.shards import ShardDataset, assign_shards, count_samples, folder_samples, write_shards
from multimae.data.synthetic import SyntheticScenes

THREE = ["rgb", "depth", "semseg"]


def _depth_sample(key: str, values: np.ndarray, scale: float) -> dict:
    h, w = values.shape
    return {"__key__": key, "rgb": torch.zeros(3, h, w, dtype=torch.uint8),
            "depth": torch.from_numpy((values.astype(np.float64) * scale).astype(np.float32))[None],
            "semseg": torch.zeros(h, w, dtype=torch.int64)}


@pytest.mark.parametrize("scale", [OFFICIAL_PNG_SCALE, 1e-3])
def test_16bit_depth_round_trips_exactly(tmp_path: Path, scale: float) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    values.flat[:6] = [0, 1, 255, 256, 65534, 65535]
    values.flat[6] = 1000  # keep a valid pixel no matter what
    paths = write_shards([_depth_sample("a", values, scale)], str(tmp_path / "s-%03d.tar"), 10, png_scale=scale)
    with tarfile.open(paths[0]) as tar:
        stored = np.array(Image.open(io.BytesIO(tar.extractfile("a.depth.png").read())))
    assert stored.dtype == np.uint16 and np.array_equal(stored, values)
    got = next(iter(ShardDataset(paths, THREE, shuffle_buffer=0)))["depth"][0].numpy()
    assert np.array_equal(np.rint(got.astype(np.float64) / scale).astype(np.uint16), values)
    assert png16_exact(scale)


def test_official_folder_to_shards_is_lossless(tmp_path: Path) -> None:
    official_folder(tmp_path / "f", n=5)
    folder = FolderDataset(tmp_path / "f", "train", specs(THREE))
    paths = write_shards(folder_samples(folder), str(tmp_path / "s" / "x-%02d.tar"), 2)
    assert len(paths) == 3 and count_samples(paths) == 5
    shards = {s["__key__"]: s for s in ShardDataset(paths, specs(THREE), shuffle_buffer=0)}
    for i in range(len(folder)):
        ref = folder.load(i)
        got = shards[ref["__key__"]]
        assert all(torch.equal(got[k], ref[k]) for k in THREE)


def test_synthetic_shards_hold_every_modality(tmp_path: Path) -> None:
    src = SyntheticScenes(5, image_size=32, seed=1)
    paths = write_shards(src, str(tmp_path / "syn-%04d.tar"), 2)
    with tarfile.open(paths[0]) as tar:
        names = set(tar.getnames())
    assert {"00000000.rgb.jpg", "00000000.depth.png", "00000000.semseg.png", "00000000.caption.txt",
            "00000000.cls", "00000000.normals.png"} <= names
    for s in ShardDataset(paths, specs() + ["label"], shuffle_buffer=0):
        ref = src[int(s["__key__"])]
        assert torch.equal(s["semseg"], ref["semseg"]) and s["caption"] == ref["caption"]
        assert int(s["label"]) == int(ref["label"]) and (s["depth"] - ref["depth"]).abs().max() <= 5e-4 + 1e-6
        assert (s["rgb"].float() - ref["rgb"].float()).abs().mean() < 3  # jpeg quality 95


# --- splitting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5, 9])
def test_assignment_partitions_samples(num_shards: int) -> None:
    per_shard = 7
    owners: dict[tuple[int, int], list] = {}
    for rank, worker in itertools.product(range(2), range(3)):
        ids, rf, wf = assign_shards(num_shards, rank, 2, worker, 3)
        for s in ids:
            kept = [i for i in range(per_shard) if rf is None or i % rf[0] == rf[1]]
            for j, i in enumerate(kept):
                if wf is None or j % wf[0] == wf[1]:
                    owners.setdefault((s, i), []).append((rank, worker))
    assert len(owners) == num_shards * per_shard and all(len(v) == 1 for v in owners.values())


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("many")
    return write_shards(SyntheticScenes(22, image_size=8, seed=0, modalities=THREE), str(out / "m-%03d.tar"), 3)


def _keys(ds: ShardDataset, workers: int) -> list[str]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["__key__"] for s in loader]


@pytest.mark.parametrize("shards", [8, 3])
def test_two_ranks_two_workers_no_overlap_full_coverage(many_shards: list[str], shards: int) -> None:
    urls = many_shards[:shards]
    total = count_samples(urls)
    seen = [_keys(ShardDataset(urls, THREE, shuffle_buffer=4, rank=r, world_size=2), workers=2) for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0]) | set(seen[1])) and len(seen[0] + seen[1]) == total


def test_every_rank_takes_the_same_number_of_steps(many_shards: list[str]) -> None:
    urls = many_shards[:3]  # 9 samples: 2 ranks get shards of 6 and 3 samples
    lengths = []
    for r in range(2):
        ds = ShardDataset(urls, THREE, rank=r, world_size=2, samples_per_rank="auto", shuffle_buffer=2)
        assert len(ds) == 5
        for workers in (0, 2):
            keys = _keys(ds, workers)
            lengths.append(len(keys))
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda b: b)
        lengths.append(sum(1 for _ in loader) * 100)
    assert lengths == [5, 5, 300, 5, 5, 300]


def test_shuffling_is_seeded_and_changes_per_epoch(many_shards: list[str]) -> None:
    def order(epoch: int | None, seed: int = 0) -> list[str]:
        ds = ShardDataset(many_shards, THREE, shuffle_buffer=8, seed=seed)
        if epoch is not None:
            ds.set_epoch(epoch)
        return [s["__key__"] for s in ds]

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    assert sorted(order(1)) == sorted(order(0))
    ds = ShardDataset(many_shards, THREE, shuffle_buffer=8)  # without set_epoch: next epoch each pass
    first, second = [s["__key__"] for s in ds], [s["__key__"] for s in ds]
    assert first == order(0) and second == order(1)


# --- bad shards ----------------------------------------------------------------------------------


def _shard_with(tmp_path: Path, drop: str | None = None, replace: tuple[str, bytes] | None = None) -> str:
    samples = []
    for s in SyntheticScenes(3, image_size=8, seed=2, modalities=THREE):
        samples.append(s)
    path = write_shards(samples, str(tmp_path / "b-%02d.tar"), 10)[0]
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if name == drop:
                continue
            if replace and name == replace[0]:
                data = replace[1]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_missing_key_names_sample_and_shard(tmp_path: Path) -> None:
    path = _shard_with(tmp_path, drop="00000001.depth.png")
    with pytest.raises(DataError, match=rf"sample 00000001 in shard {path}: missing key 'depth.png'"):
        list(ShardDataset([path], THREE, shuffle_buffer=0))
    with pytest.raises(DataError, match=r"missing key 'cls'"):
        list(ShardDataset([path], ["rgb", "label"], shuffle_buffer=0))


def test_bad_field_in_shard_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _shard_with(tmp_path, replace=("00000002.rgb.jpg", b"garbage"))
    with pytest.raises(DataError, match=rf"sample 00000002 in shard {path}: rgb.jpg: truncated or not an image"):
        list(ShardDataset([path], THREE, shuffle_buffer=0))
    ds = ShardDataset([path], THREE, shuffle_buffer=0, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="multimae.data"):
        keys = [s["__key__"] for s in ds]
    assert keys == ["00000000", "00000001"] and ds.skipped == 1 and "00000002" in caplog.text
    ds = ShardDataset([path], THREE, shuffle_buffer=0, on_error="skip", samples_per_rank=5)
    assert len(list(ds)) == 5 and ds.skipped == 2  # refills the quota from good samples


def test_truncated_shard(tmp_path: Path) -> None:
    good = _shard_with(tmp_path)
    bad = tmp_path / "trunc.tar"
    bad.write_bytes(Path(good).read_bytes()[:700])
    with pytest.raises(DataError, match=rf"shard {bad}: truncated or not a tar file"):
        list(ShardDataset([str(bad)], THREE, shuffle_buffer=0))
    ds = ShardDataset([str(bad), good], THREE, shuffle_buffer=0, on_error="skip")
    ds.set_epoch(0)
    assert len(list(ds)) >= 3 and ds.skipped >= 1


def test_writer_rejects_bad_keys_and_patterns(tmp_path: Path) -> None:
    s = SyntheticScenes(1, image_size=8, modalities=["rgb"])[0]
    with pytest.raises(DataError, match="cannot contain '.'"):
        write_shards([dict(s, __key__="a.b")], str(tmp_path / "x-%d.tar"), 5)
    with pytest.raises(ValueError, match="%d"):
        write_shards([s], str(tmp_path / "x.tar"), 5)
