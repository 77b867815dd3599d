"""``benchmarks/common.py``, the helpers every benchmark shares: FLOP counts (CPU flash attention
included), atomic result files, the machine line, and one GPU peak table for every script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def test_count_flops_of_a_matmul_and_of_cpu_attention() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert common.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = torch.randn(1, 2, 32, 8, requires_grad=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        fwd = common.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert fwd == 2 * (2 * 2 * 32 * 32 * 8)  # q k^T and (softmax) v, counted for the CPU flash kernel


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "r.json"
    common.write_json_atomic(out, {"a": 1})
    common.write_json_atomic(out, {"a": 2, "p": tmp_path})  # default=str for paths
    assert json.loads(out.read_text()) == {"a": 2, "p": str(tmp_path)}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
    with pytest.raises(RuntimeError):
        common.write_atomic(out, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert json.loads(out.read_text())["a"] == 2 and [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_machine_line_names_the_cpu_and_load() -> None:
    line = common.machine_line()
    assert line.startswith("CPU: ") and "native bf16 matmul" in line and "load average" in line
    assert common.peak_rss_mb() >= common.current_rss_mb() > 0


def test_every_script_uses_the_one_peak_table() -> None:
    """No benchmark keeps a GPU peak table or an MFU constant of its own."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.name == "common.py":
            continue
        text = path.read_text()
        assert "989.0" not in text and "835.0" not in text and "_TFLOPS = {" not in text, path.name
    assert common.nominal_peak("NVIDIA H100 NVL") == (835.0, "H100 NVL")


@pytest.mark.parametrize("script", ["vs_official.py", "vs_official_finetune.py", "reproduce.py", "fsdp_memory.py"])
def test_split_scripts_parse_their_arguments(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
