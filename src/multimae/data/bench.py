"""``multimae data bench``: how fast the training loader's per-sample work runs on your own data.

One CPU thread in this process decodes and transforms ``num`` samples (after a warm-up one) the
way a loader worker does (``data.fast_decode`` path, the pretraining crop and flip), and again
decoding only. The rate per CPU second is what one core delivers; the cores one GPU needs follow
from the images per second it trains at (``gpu_rate``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from multimae.data.config import DataConfig
from multimae.core.modalities import ModalitySpec


@dataclass(frozen=True)
class BenchResult:
    samples: int
    wall: float  # samples per second (elapsed)
    cpu: float  # samples per CPU second of this process
    decode_cpu: float  # samples per CPU second, decoding only

    def cores(self, gpu_rate: float) -> float:
        """Cores that keep a GPU training at ``gpu_rate`` images/s busy."""
        return gpu_rate / self.cpu


def _rates(items: Callable[[], Iterable], n: int) -> tuple[float, float]:
    """(samples per wall second, per CPU second) of ``n`` items after a warm-up one; a small
    dataset is read again as often as it takes."""
    def endless() -> Iterator:
        while True:
            count = 0
            for item in items():
                count += 1
                yield item
            if count == 0:
                raise ValueError("the dataset yielded no sample")

    it = endless()
    next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)


def _source(data: DataConfig, specs: Sequence[ModalitySpec], transform: object | None) -> Callable[[], Iterable]:
    from multimae.data.loader import build_dataset, shard_urls

    packed = data.fast_decode
    if data.source == "shards":
        from multimae.data.shards import ShardDataset

        if not data.urls:
            raise ValueError("data.urls must name the shards (--urls)")
        ds = ShardDataset(shard_urls(data.urls), specs, transform=transform, shuffle_buffer=0, on_error=data.on_error,
                          packed=packed)
        return lambda: iter(ds)
    base = build_dataset(data, specs, seed=0, packed=packed)
    if base is None or len(base) == 0:
        raise ValueError(f"no samples in {data.root!r}")
    apply = transform if transform is not None else (lambda s: s)
    return lambda: (apply(base[i]) for i in range(len(base)))


def bench(data: DataConfig, specs: Sequence[ModalitySpec], num: int = 200, image_size: int = 224) -> BenchResult:
    """Rates of the training loader's per-sample work (decode + pretraining transforms) on one
    thread, and of decoding alone, over ``num`` samples of ``data`` (folder or shards)."""
    from multimae.data.transforms import PairedTransform

    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tf = PairedTransform(specs, image_size, scale=tuple(data.crop_scale), hflip=data.hflip, fast=data.fast_decode)
        wall, cpu = _rates(_source(data, specs, tf), num)
        _, decode_cpu = _rates(_source(data, specs, None), num)
    finally:
        torch.set_num_threads(threads)
    return BenchResult(num, wall, cpu, decode_cpu)


def report(result: BenchResult, gpu_rate: float) -> str:
    """Lines for the terminal."""
    return "\n".join([
        f"decode + transforms: {result.cpu:.1f} samples per CPU second ({result.wall:.1f} per second elapsed), "
        f"{result.samples} samples, one thread",
        f"decode only:         {result.decode_cpu:.1f} samples per CPU second",
        f"one GPU at {gpu_rate:g} images/s needs {result.cores(gpu_rate):.1f} cores of this machine "
        f"(data.num_workers >= {math.ceil(result.cores(gpu_rate))} per GPU, when each worker has its core)",
    ])
