"""``benchmarks/data_throughput.py``: the quick run writes the side-by-side table of the four paths
with the CPU, the load average and the cores per H100; the plain pipeline produces model-ready
tensors; main's fast path is patched in only inside its context."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "benchmarks" / "data_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["data_throughput"] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("data_throughput", None)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_run_writes_the_paths_side_by_side(bench, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "data_throughput.md"
    try:
        assert bench.main(["--quick", "--num", "3", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert re.search(r'CPU "[^"]+", \d+ CPUs .*load average [\d.]+ / [\d.]+ / [\d.]+ at the start', text)
    assert "| source | plain | reference | main fast | fast | fast / plain | fast / main fast |" in text
    for source in ("folder 256->224", "shards 256->224"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {source} | ") and "(" in line)
        pairs = [(float(r), float(c)) for r, c in re.findall(r"([\d.]+) \(([\d.]+)\)", row)]
        assert len(pairs) == 4 and all(r > 0 for r, _ in pairs)
        for r, c in pairs:  # cores per H100 = 1500 / rate, both printed to one decimal
            assert c == pytest.approx(1500 / r, abs=0.051 + 1500 * 0.05 / r ** 2)
    assert "| decode depth |" in text and "| total (samples per CPU second) |" in text


def test_plain_sample_and_main_fast_context(bench) -> None:
    from multimae.data import codecs, shards, transforms
    from multimae.data.codecs import encode_field
    from multimae.data.synthetic import SyntheticScenes

    x = SyntheticScenes(1, 256, seed=0, modalities=["rgb", "depth", "semseg"])[0]
    files = [encode_field(x[k], k)[1] for k in ("rgb", "depth", "semseg")]
    out = bench.plain_sample(*files)
    assert out["rgb"].shape == (3, 224, 224) and out["rgb"].dtype == torch.float32
    assert out["depth"].shape == (1, 224, 224) and out["semseg"].shape == (56, 56)
    assert out["semseg"].dtype == torch.int64 and type(out["rgb"]) is torch.Tensor
    before = (codecs.simplejpeg, transforms.robust_standardize_fast, transforms._image_fast, shards._file_samples)
    with bench.main_fast_path():
        assert codecs.simplejpeg is None and transforms._image_fast is bench._main_image_fast
        assert transforms._depth_fast is bench._main_depth_fast
        assert shards._file_samples is bench._main_file_samples
    assert (codecs.simplejpeg, transforms.robust_standardize_fast, transforms._image_fast,
            shards._file_samples) == before
