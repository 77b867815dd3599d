"""``data.decode=cuda``: JPEGs decoded, cropped and resized in the main process on the training
device (:mod:`multimae.data.device_decode`), run here with ``decode_device="cpu"`` -- everything
but the CUDA call (``torchvision.io.decode_jpeg(list, device=...)`` on the CPU is libjpeg-turbo,
as simplejpeg on the CPU path). Outputs: bit for bit the CPU fast path's with the uint8 resize;
within one level of rounding with the float resize CUDA uses (``benchmarks/gpu_check.py``,
section ``jpeg_decode``, measures the CUDA path itself)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutils import specs as synthetic_specs
from PIL import Image

from multimae.core.batch import Batch
from multimae.data.codecs import EncodedJpeg, Packed, decode_encoded, decode_packed
from multimae.data.config import DataConfig, MaskConfig
from multimae.data.device_decode import DEFERRED, DeviceDecodeLoader, decode_on_device
from multimae.data.errors import DataError
from multimae.data.folder import FolderDataset, write_folder
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import write_shards
from multimae.data.synthetic import SyntheticScenes

MODS = ["rgb", "depth", "semseg"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("devdec")
    scenes = SyntheticScenes(12, image_size=48, seed=3, modalities=MODS)
    write_folder(scenes, root, "train", image_format="jpg")
    png = next((root / "train" / "rgb").rglob("*.jpg"))  # one rgb as PNG: decoded by the worker
    buf = io.BytesIO()
    Image.open(png).save(buf, format="PNG")
    png.with_suffix(".png").write_bytes(buf.getvalue())
    png.unlink()
    urls = ",".join(write_shards(_folder_samples(root), str(root / "s-%04d.tar"), 4))
    return root, urls


def _folder_samples(root: Path):  # type: ignore[no-untyped-def]
    from multimae.data.shards import folder_samples

    return folder_samples(FolderDataset(root, "train", synthetic_specs(MODS)))


def _batches(root: Path, urls: str, source: str, decode: str, workers: int = 0, epochs: tuple = (0, 1),
             start: int = 0, **kw) -> list[tuple[Batch, object]]:
    specs = synthetic_specs(MODS)
    spec = BatchSpec(tuple(specs), tuple(specs), patch_size=8, image_size=32)
    cfg = DataConfig(source=source, root=str(root), urls=urls, num_samples=12, num_workers=workers,
                     shuffle_buffer=4, decode=decode)
    loader, position = build_loader(cfg, MaskConfig(num_visible=12), spec, seed=5, batch_size=4,
                                    decode_device="cpu" if decode == "cuda" else None)
    if kw.get("inner"):  # the DataLoader's own batches: rgb still deferred
        loader = loader.loader
    elif kw:
        loader.uint8_resize = kw["uint8_resize"]
    out = []
    for epoch in epochs:
        position.set_epoch(epoch, start)
        out += list(loader)
    return out


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_device_decode_gives_the_cpu_fast_path_batches(data: tuple[Path, str], source: str) -> None:
    root, urls = data
    cpu, dev = _batches(root, urls, source, "cpu"), _batches(root, urls, source, "cuda")
    assert len(cpu) == len(dev) == 6
    deferred_rows = 0
    for (a, pa), (b, pb) in zip(cpu, dev):
        assert a.extra["__key__"] == b.extra["__key__"] and DEFERRED not in b.extra
        for k in MODS:
            assert torch.equal(a[k], b[k]), k
        assert all(torch.equal(pa.masks[n], pb.masks[n]) for n in pa.masks)
    for b, _ in _batches(root, urls, source, "cuda", inner=True):
        deferred_rows += len(b.extra[DEFERRED]["rgb"].index)
        assert b["rgb"].shape == (4, 3, 32, 32)
    assert deferred_rows == 22  # 2 epochs x 12 samples, but the PNG one (decoded by the worker)


def test_deferred_batches_cross_worker_processes_and_resume(data: tuple[Path, str]) -> None:
    """Shards with a worker process (the deferred bytes travel in one blob per batch), resumed at
    batch 2 of epoch 1: the batches the uninterrupted epoch had."""
    root, urls = data
    full = _batches(root, urls, "shards", "cuda", workers=1, epochs=(1,))
    resumed = _batches(root, urls, "shards", "cuda", workers=1, epochs=(1,), start=2)
    cpu = _batches(root, urls, "shards", "cpu", workers=1, epochs=(1,))
    assert len(full) == 3 and len(resumed) == 1
    assert all(torch.equal(a["rgb"], b["rgb"]) for (a, _), (b, _) in zip(cpu, full))
    assert resumed[0][0].extra["__key__"] == full[2][0].extra["__key__"]
    assert torch.equal(resumed[0][0]["rgb"], full[2][0]["rgb"])


def test_float_resize_as_on_cuda_is_within_one_level(data: tuple[Path, str]) -> None:
    """The branch CUDA runs (antialiased resize in float, rounded): within one 8-bit level of the
    uint8 kernel, after normalisation (x / 255 - mean) / std."""
    root, urls = data
    cpu = _batches(root, urls, "folder", "cpu")
    flt = _batches(root, urls, "folder", "cuda", uint8_resize=False)
    one_level = 1.0 / (255 * 0.224) + 1e-5  # the smallest ImageNet std
    worst = max(float((a["rgb"] - b["rgb"]).abs().max()) for (a, _), (b, _) in zip(cpu, flt))
    assert 0 < worst <= one_level
    assert all(torch.equal(a["depth"], b["depth"]) for (a, _), (b, _) in zip(cpu, flt))


def test_only_rgb_jpegs_stay_encoded(data: tuple[Path, str]) -> None:
    root, _ = data
    spec = synthetic_specs(["rgb"])[0]
    ds = FolderDataset(root, "train", synthetic_specs(MODS), packed="encoded")
    kinds = {type(ds.load(i)["rgb"]) for i in range(len(ds))}
    assert kinds == {EncodedJpeg, Packed}  # the PNG is decoded by the worker
    jpg = next((root / "train" / "rgb").rglob("*.jpg")).read_bytes()
    enc = decode_encoded(jpg, "jpg", spec, 1.0, "x.jpg")
    assert isinstance(enc, EncodedJpeg) and enc.shape == (3, 48, 48)
    assert np.array_equal(enc.pixels(), decode_packed(jpg, "jpg", spec, 1.0, "x.jpg").array)  # the reference
    grey = synthetic_specs([{"name": "grey", "kind": "image", "channels": 1}])[0]
    assert not isinstance(decode_encoded(jpg, "jpg", grey, 1.0, "x.jpg"), EncodedJpeg)


def test_a_jpeg_the_device_cannot_decode_is_named(data: tuple[Path, str]) -> None:
    """A file the batched decode refuses: decoded one by one to name the sample. (A damaged scan
    behind a good header is only warned about by libjpeg-turbo, which then fills the rest.)"""
    from multimae.data.device_decode import DeferredImage, DeferredImages

    root, urls = data
    batch, plan = _batches(root, urls, "folder", "cpu", epochs=(0,))[0]
    assert len(DeviceDecodeLoader([], "cpu")) == 0
    jpg = next((root / "train" / "rgb").rglob("*.jpg")).read_bytes()
    items = [DeferredImage(jpg, (0, 0, 40, 40), False, 32, None), DeferredImage(b"GIF89a" + jpg, (0, 0, 8, 8), True,
                                                                                 32, None)]
    broken = Batch(dict(batch.tensors), extra={**batch.extra, DEFERRED: {"rgb": DeferredImages.of(items, [0, 2])}})
    with pytest.raises(DataError, match=f"sample {batch.extra['__key__'][2]}: the JPEG could not be decoded"):
        decode_on_device(broken, "cpu")


def test_decode_cuda_needs_a_device_and_a_fast_path_source(data: tuple[Path, str]) -> None:
    root, urls = data
    specs = synthetic_specs(MODS)
    spec = BatchSpec(tuple(specs), tuple(specs), patch_size=8, image_size=32)
    with pytest.raises(ValueError, match="folder and shard sources"):
        build_loader(DataConfig(source="synthetic", image_size=32, num_samples=8, decode="cuda"), MaskConfig(), spec,
                     seed=0, batch_size=4, decode_device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            build_loader(DataConfig(source="folder", root=str(root), decode="cuda"), MaskConfig(), spec, seed=0,
                         batch_size=4)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        build_loader(DataConfig(source="folder", root=str(root), decode="gpu"), MaskConfig(), spec,  # type: ignore[arg-type]
                     seed=0, batch_size=4)


def test_pinning_a_batch_keeps_padding_presence_and_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(1) or self.clone())
    b = Batch({"rgb": torch.ones(2, 3, 4, 4), "caption": torch.ones(2, 5, dtype=torch.long)},
              pad={"caption": torch.zeros(2, 5, dtype=torch.bool)}, present={"rgb": torch.tensor([True, False])},
              extra={"__key__": ["a", "b"], "label": torch.tensor([1, 2])})
    out, _ = pin_memory((b, None))
    assert isinstance(out, Batch) and out.extra["__key__"] == ["a", "b"] and torch.equal(out.extra["label"], b.extra["label"])
    assert set(out.pad) == {"caption"} and torch.equal(out.present["rgb"], b.present["rgb"])
    assert len(pinned) == 5
