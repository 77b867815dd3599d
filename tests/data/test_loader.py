"""The loader (multimae.data.loader): every batch of every source gets its own MaskPlan, a pure
function of (seed, epoch, rank, worker, batch index); streamed shards resume mid-epoch exactly."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multimae.data.config import DataConfig, MaskConfig
from multimae.data.loader import BatchSpec, build_loader
from multimae.data.shards import write_shards
from multimae.data.synthetic import SPEC_OVERRIDES, SyntheticScenes
from multimae.core.modalities import resolve

IMAGE = resolve(["rgb", "depth", "semseg"], SPEC_OVERRIDES)
SPEC = BatchSpec(tuple(IMAGE), tuple(IMAGE), patch_size=8, image_size=32)
MASK = MaskConfig(num_visible=12)


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")
    ds = SyntheticScenes(32, image_size=32, seed=5, modalities=["rgb", "depth", "semseg"])
    return ",".join(write_shards((ds[i] for i in range(len(ds))), str(out / "s-%06d.tar"), max_count=8))


def _epochs(data: DataConfig, seed: int, epochs: int = 2, rank: int = 0, world: int = 1, spec: BatchSpec = SPEC,
            start: int = 0, mask: MaskConfig = MASK) -> list[tuple[tuple, tuple[str, ...], bytes]]:
    """(epoch, keys, plan bytes) of every batch a rank's loader yields in ``epochs`` epochs."""
    loader, position = build_loader(data, mask, spec, seed, batch_size=4, rank=rank, world_size=world)
    out = []
    for epoch in range(epochs):
        position.set_epoch(epoch, start if epoch == 0 else 0)
        for batch, plan in loader:
            masks = torch.cat([plan.masks[n] for n in sorted(plan.masks)], dim=1)
            out.append((epoch, tuple(batch.extra["__key__"]), masks.numpy().tobytes()))
    return out


def test_shard_plans_differ_by_batch_epoch_worker_and_rank(shard_urls: str) -> None:
    data = DataConfig(source="shards", urls=shard_urls, num_samples=32, image_size=32, num_workers=2,
                      shuffle_buffer=8)
    runs = {r: _epochs(data, seed=3, rank=r, world=2) for r in (0, 1)}
    plans = [p for r in runs for _, _, p in runs[r]]
    assert len(plans) == 2 * 2 * 4  # ranks x epochs x batches per epoch and rank
    assert len(set(plans)) == len(plans)  # every batch its own plan
    for epoch in (0, 1):  # the ranks split every epoch's samples between them
        keys = [set(k for e, ks, _ in runs[r] if e == epoch for k in ks) for r in (0, 1)]
        assert len(keys[0]) == len(keys[1]) == 16 and not keys[0] & keys[1]
    assert [b[1] for b in runs[0] if b[0] == 0] != [b[1] for b in runs[0] if b[0] == 1]  # reshuffled per epoch
    assert _epochs(data, seed=3, rank=1, world=2) == runs[1]  # same seed: same batches and plans
    assert [p for _, _, p in _epochs(data, seed=4, rank=1, world=2)] != [p for _, _, p in runs[1]]


def test_shard_stream_resumes_mid_epoch_exactly(shard_urls: str) -> None:
    """Starting an epoch at batch k (odd, so DataLoader workers swap roles) yields exactly the
    uninterrupted run's batches k.. and plans."""
    data = DataConfig(source="shards", urls=shard_urls, num_samples=32, image_size=32, num_workers=2,
                      shuffle_buffer=8)
    full = _epochs(data, seed=3, epochs=1)
    for start in (1, 3):
        assert _epochs(data, seed=3, epochs=1, start=start) == full[start:]


@pytest.mark.parametrize("source", ["synthetic", "unpaired-text"])
def test_map_style_plans_differ_by_batch_and_epoch(source: str) -> None:
    spec, mask = SPEC, MASK
    data = DataConfig(source="synthetic", num_samples=16, image_size=32, num_workers=2)
    if source == "unpaired-text":  # rgb + caption with image-only / text-only samples mixed in
        text = resolve(["rgb", "caption"])
        spec = BatchSpec(tuple(text), tuple(text), patch_size=8, image_size=32)
        mask = MaskConfig(strategy="ratio", ratios={"rgb": 0.75, "caption": 0.5})
        data.image_only, data.text_only = 0.3, 0.3
    for rank in (0, 1):
        runs = _epochs(data, seed=1, rank=rank, world=2, spec=spec, mask=mask)
        plans = [p for _, _, p in runs]
        assert len(plans) == 4 and len(set(plans)) == 4
        assert _epochs(data, seed=1, rank=rank, world=2, spec=spec, mask=mask) == runs


def test_collator_refuses_untagged_samples() -> None:
    from multimae.data.loader import MaskCollator

    collate = MaskCollator(SPEC, MASK, seed=0)
    sample = {"rgb": torch.zeros(3, 32, 32), "depth": torch.zeros(1, 32, 32), "semseg": torch.zeros(8, 8).long()}
    with pytest.raises(ValueError, match="__batch__"):
        collate([dict(sample), dict(sample)])


def test_num_workers_auto_sizes_from_cores() -> None:
    from multimae.core.config import ConfigError, from_dict
    from multimae.data.loader import resolve_workers

    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    assert resolve_workers("auto", cores=16, local_ranks=1) == 15  # one core left for the training step
    assert resolve_workers("auto", cores=16, local_ranks=8) == 1
    assert resolve_workers("auto", cores=2, local_ranks=1) == 1
    assert resolve_workers("auto", cores=128, local_ranks=1) == 16
    with pytest.raises(ValueError, match="data.num_workers must be a number >= 0 or 'auto', got -1"):
        resolve_workers(-1)
    assert from_dict(DataConfig, {"num_workers": "auto"}).num_workers == "auto"
    assert from_dict(DataConfig, {"num_workers": 4}).num_workers == 4
    with pytest.raises(ConfigError, match="num_workers"):
        from_dict(DataConfig, {"num_workers": "many"})
    loader, _ = build_loader(DataConfig(source="synthetic", num_samples=8, image_size=32, num_workers="auto"),
                             MASK, SPEC, seed=0, batch_size=4)
    assert loader.num_workers >= 1



def test_comma_listed_shard_urls_ignore_spaces_around_commas(shard_urls: str) -> None:
    from multimae.data.loader import shard_urls as parse

    assert parse("a.tar, b.tar ,c.tar,") == ["a.tar", "b.tar", "c.tar"]
    assert parse("s-{0..3}.tar") == "s-{0..3}.tar"  # a brace pattern stays for webdataset
    spaced = DataConfig(source="shards", urls=shard_urls.replace(",", ", "), num_samples=32, image_size=32,
                        num_workers=0, shuffle_buffer=8)
    assert _epochs(spaced, seed=3, epochs=1) == _epochs(replace(spaced, urls=shard_urls), seed=3, epochs=1)
