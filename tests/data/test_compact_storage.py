"""The loader's codecs: RGB JPEGs through simplejpeg equal PIL's decoding bit for bit, and the
compact ``.zst`` storage of depth and class maps in shards decodes to the same tensors as the PNGs
it replaces, on both data paths, with exact mid-epoch resume."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from PIL import Image

from multimae.core import modalities
from multimae.data import codecs
from multimae.data.codecs import Packed, decode_field, decode_packed, encode_zst, read_pixels
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.errors import DataError
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import ShardDataset, folder_samples, write_shards
from multimae.data.synthetic import SPEC_OVERRIDES, SyntheticScenes
from multimae.data.transforms import PairedTransform

SPECS = modalities.resolve(["rgb", "depth", "semseg"], SPEC_OVERRIDES)


def _jpeg(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_turbo_jpeg_is_pils_decoding(subsampling: int) -> None:
    rng = np.random.default_rng(subsampling)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data = _jpeg(arr, quality=90, subsampling=subsampling)
    fast = codecs._jpeg_turbo(data, 3)
    assert fast is not None  # taken by simplejpeg, not PIL
    assert np.array_equal(fast, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    grey = _jpeg(arr[..., 0])
    assert np.array_equal(read_pixels(grey, 3, "g.jpg"), np.asarray(Image.open(io.BytesIO(grey)).convert("RGB")))


def test_turbo_jpeg_leaves_exif_grey_output_and_broken_files_to_pil() -> None:
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255
    exif = Image.Exif()
    exif[codecs.ORIENTATION_TAG] = 6  # rotate 90: PIL applies it
    data = _jpeg(arr, quality=95, subsampling=0, exif=exif.tobytes())
    assert codecs._jpeg_turbo(data, 3) is None
    assert read_pixels(data, 3, "e.jpg").shape == (16, 8, 3)
    plain = _jpeg(arr, quality=95)
    assert codecs._jpeg_turbo(plain, 1) is None  # PIL's own RGB -> L conversion
    with pytest.raises(DataError, match=r"t\.jpg: truncated or not an image"):
        read_pixels(plain[: len(plain) // 2], 3, "t.jpg")


@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000,
                                 np.arange(12, dtype=np.uint8).reshape(3, 4)])
def test_zst_round_trip_and_png_equivalence(arr: np.ndarray) -> None:
    got = codecs.zst_array(encode_zst(arr), "x.zst")
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    depth, semseg = SPECS[1], SPECS[2]
    png = codecs._png_bytes(arr)
    assert torch.equal(decode_field(encode_zst(arr), "zst", depth, 1e-3, "d"), decode_field(png, "png", depth, 1e-3, "d"))
    assert torch.equal(decode_field(encode_zst(arr), "zst", semseg, 1.0, "s"), decode_field(png, "png", semseg, 1.0, "s"))
    packed = decode_packed(encode_zst(arr), "zst", semseg, 1.0, "s")
    assert isinstance(packed, Packed) and torch.equal(packed.tensor(), torch.from_numpy(arr.astype(np.int64)))


def test_bad_zst_fields_name_the_field() -> None:
    data = encode_zst(np.ones((4, 4), np.uint16))
    with pytest.raises(DataError, match=r"d\.zst: truncated or not a zstd stream"):
        codecs.zst_array(data[:-3], "d.zst")
    with pytest.raises(DataError, match=r"d\.zst: truncated or not a zstd stream"):
        codecs.zst_array(b"not zstd at all", "d.zst")
    big = zstandard.ZstdCompressor().compress(b"\0" * 100)  # declares 100 bytes: over a 50-byte limit
    old, codecs.MAX_ZST_BYTES = codecs.MAX_ZST_BYTES, 50
    try:
        with pytest.raises(DataError, match=r"d\.zst: .* too large size \(100 bytes, limit 50\)"):
            codecs.zst_array(big, "d.zst")
    finally:
        codecs.MAX_ZST_BYTES = old
    floats = io.BytesIO()
    np.save(floats, np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match=r"d\.zst: a \.zst map holds integers"):
        decode_field(zstandard.ZstdCompressor().compress(floats.getvalue()), "zst", SPECS[1], 1.0, "d.zst")
    with pytest.raises(DataError, match=r"does not hold a \.npy array"):
        codecs.zst_array(zstandard.ZstdCompressor().compress(b"x" * 40), "d.zst")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compact")
    write_folder(SyntheticScenes(12, image_size=48, seed=3, modalities=["rgb", "depth", "semseg"]), root, "train")
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compact_shards_hold_the_same_samples_as_png_shards(folder: Path, tmp_path: Path) -> None:
    src = FolderDataset(folder, "train", SPECS)
    png = write_shards(folder_samples(src), str(tmp_path / "p-%04d.tar"), 5)
    zst = write_shards(folder_samples(src, compact=True), str(tmp_path / "z-%04d.tar"), 5, compact=True)
    names = [m.name for m in tarfile.open(zst[0])]
    assert any(n.endswith(".depth.zst") for n in names) and any(n.endswith(".semseg.zst") for n in names)
    for packed in (False, True):
        a = list(ShardDataset(png, SPECS, shuffle_buffer=0, packed=packed))
        b = list(ShardDataset(zst, SPECS, shuffle_buffer=0, packed=packed))
        assert len(a) == len(b) == len(src)
        for x, y in zip(a, b):
            assert x["__key__"] == y["__key__"]
            for k in ("rgb", "depth", "semseg"):
                xt = x[k].tensor() if isinstance(x[k], Packed) else x[k]
                yt = y[k].tensor() if isinstance(y[k], Packed) else y[k]
                assert torch.equal(xt, yt), (x["__key__"], k)
    # the fast path on compact shards = the reference path on PNG shards (within the documented tolerance)
    ref = ShardDataset(png, SPECS, transform=PairedTransform(SPECS, 32, seed=1), shuffle_buffer=0)
    fast = ShardDataset(zst, SPECS, transform=PairedTransform(SPECS, 32, seed=1, fast=True), shuffle_buffer=0,
                        packed=True)
    for x, y in zip(ref, fast):
        assert torch.equal(x["semseg"], y["semseg"]) and float((x["rgb"] - y["rgb"]).abs().max()) <= 1e-6
        assert float(((x["depth"] - y["depth"]).abs() / x["depth"].abs().clamp_min(1)).max()) <= 1e-5


def test_written_compact_shards_keep_depth_quantised_like_png(tmp_path: Path) -> None:
    scenes = SyntheticScenes(4, image_size=24, seed=2, modalities=["rgb", "depth", "semseg"])
    png = write_shards(scenes, str(tmp_path / "p-%04d.tar"), 10)
    zst = write_shards(scenes, str(tmp_path / "z-%04d.tar"), 10, compact=True)
    for x, y in zip(ShardDataset(png, SPECS, shuffle_buffer=0), ShardDataset(zst, SPECS, shuffle_buffer=0)):
        assert all(torch.equal(x[k], y[k]) for k in ("rgb", "depth", "semseg"))


def _batches(urls: str, start: int) -> list[tuple]:
    spec = BatchSpec(tuple(SPECS), tuple(SPECS), patch_size=8, image_size=32)
    data = DataConfig(source="shards", urls=urls, num_samples=24, image_size=32, num_workers=2, shuffle_buffer=6)
    loader, position = build_loader(data, MaskConfig(num_visible=12), spec, seed=3, batch_size=4)
    position.set_epoch(0, start)
    return [(tuple(b.extra["__key__"]), b["rgb"].numpy().tobytes(), b["depth"].numpy().tobytes(),
             b["semseg"].numpy().tobytes(), torch.cat([p.masks[n] for n in sorted(p.masks)], 1).numpy().tobytes())
            for b, p in loader]


def test_compact_shards_resume_mid_epoch_exactly(tmp_path: Path) -> None:
    """Starting at batch k (odd: the DataLoader workers swap roles) gives the uninterrupted run's
    batches k.., pixels and MaskPlans included."""
    scenes = SyntheticScenes(24, image_size=40, seed=6, modalities=["rgb", "depth", "semseg"])
    urls = ",".join(write_shards(scenes, str(tmp_path / "z-%04d.tar"), 6, compact=True))
    full = _batches(urls, 0)
    assert len(full) == 6
    for start in (1, 4):
        assert _batches(urls, start) == full[start:]


def _tar(path: Path, fmt: int, entries: list[tuple[str, bytes | None]]) -> Path:
    """A tar of regular files (bytes), directories (None) and a symlink ("->target")."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data.startswith(b"->"):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:].decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _tarfile_entries(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r|") as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar if i.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_yields_what_tarfile_yields(tmp_path: Path, fmt: int) -> None:
    from multimae.data.shards import tar_entries

    deep = "/".join(["d" * 30] * 4) + "/k1.rgb.jpg"  # > 100 characters: ustar prefix / GNU long name / pax path
    entries = [("dir", None), ("dir/k0.rgb.jpg", b"x" * 700), ("dir/k0.cls", b"3"), (deep, b"y" * 512),
               ("k2.depth.zst", b""), ("k3.semseg.png", bytes(range(256)) * 3)]
    if fmt == tarfile.PAX_FORMAT:
        entries.append(("käse/k4.caption.txt", "non-ascii name".encode()))
    path = _tar(tmp_path / "a.tar", fmt, entries)
    assert list(tar_entries(str(path))) == _tarfile_entries(path)
    # a symlink: tarfile takes over from there, with the same result
    path = _tar(tmp_path / "b.tar", fmt, entries[:3] + [("k9.link", b"->dir/k0.cls")] + entries[3:])
    assert list(tar_entries(str(path))) == _tarfile_entries(path)


def test_tar_reader_refuses_damaged_archives(tmp_path: Path) -> None:
    from multimae.data.shards import tar_entries

    good = _tar(tmp_path / "a.tar", tarfile.GNU_FORMAT, [("k0.rgb.jpg", b"x" * 2000), ("k1.rgb.jpg", b"z" * 100)])
    data = good.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1500])
    with pytest.raises(ValueError, match="unexpected end of data"):
        list(tar_entries(str(tmp_path / "cut.tar")))
    bad = bytearray(data)
    bad[0] ^= 1  # the first header's name: its checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad checksum at offset 0"):
        list(tar_entries(str(tmp_path / "bad.tar")))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        list(tar_entries(str(tmp_path / "empty.tar")))
    (tmp_path / "noend.tar").write_bytes(data[:512 + 2048 + 512 + 512])  # no end-of-archive blocks
    assert [n for n, _ in tar_entries(str(tmp_path / "noend.tar"))] == ["k0.rgb.jpg", "k1.rgb.jpg"]
