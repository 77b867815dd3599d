"""``benchmarks/gpu_check.py``: the dry run executes every section of the GPU check on the CPU at tiny
size and writes a report with each section's numbers; without a GPU and without ``--dry-run`` it
refuses with a clear message; the peak table and the goal verdict read device names correctly."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)


def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert data["meta"]["dry_run"] is True and "--dry-run" in data["meta"]["command"]
    R = data["results"]
    # attention and optimizer: the CPU flash kernel and fused AdamW really ran in the profiled step
    att = R["attention_optimizer"]
    assert att["forced_flash_forward"] == "ok" and att["flash_ok"], att
    assert any("flash" in k for k in att["flash_ops_in_step"])
    assert att["adamw_fused_flag"] and att["fused_adamw_ok"] and att["fused_adamw_ops_in_step"]
    # every timed row has positive throughput and FLOPs; compile is skipped in a dry run
    for key in ("pretrain_eager", "ddp", "fsdp"):
        r = R[key]
        assert r["status"] == "ok", r
        assert r["img_s"] > 0 and r["flops_per_step"] > 0 and r["s_per_step"] > 0
        assert "peak_memory_gb" in r and "mfu" in r
    assert R["pretrain_compiled"]["status"] == "skipped"
    assert R["ddp"]["process_group"].startswith("gloo, world size 1")
    assert R["fsdp"]["process_group"].startswith("gloo, world size 1")
    fm = R["fsdp_meta"]  # FSDP start-up on the meta device: the plain build's weights, and it trains
    assert fm["status"] == "ok" and fm["built_on_meta"] and fm["weights_equal_plain_build"], fm
    assert 0 < fm["step_loss"] < 100 and "weights equal to a plain CPU build of the same seed: **True**" in md
    heads = ("semseg (ConvNeXt)", "depth (DPT)", "cls (linear)")
    for h in heads:
        ft = R["finetune"][h]
        assert ft.get("status", "ok") == "ok", (h, ft)
        assert ft["img_s"] > 0 and ft["flops_per_step"] > 0 and ft["adamw_fused"], (h, ft)
        assert R["inference"][h]["img_s"] > 0, h
    assert R["inference"]["pretrain model, rgb -> all"]["img_s"] > 0
    assert "dry run" in R["goal"]["verdict"] and R["goal"]["best_img_s"] > 0
    for title in ("## Environment", "## Attention kernel (flash SDPA)", "## Optimizer (fused AdamW)",
                  "## Pre-training step", "## Fine-tuning step per head", "## Host syncs and graph breaks", "## Inference", "## Goal", "## Failures"):
        assert title in md, title
    for row in ("| eager | 2 |", "| DDP, 1 rank | 2 |", "| FSDP2, 1 rank | 2 |", "| torch.compile | skipped"):
        assert row in md, row
    assert "**flash SDPA used**" in md and "**fused AdamW used**" in md
    # step checks: no host sync outside log steps in any step; the pretraining forward + loss is one
    # graph (a dry run traces only it: tests/engine/test_fullgraph.py covers the heads)
    checks = R["step_checks"]
    for name in ("pretrain", *heads):
        assert checks[name]["syncs_per_step"] == 0, (name, checks[name])
    assert checks["pretrain"]["graphs"] == 1 and checks["pretrain"]["graph_breaks"] == 0, checks["pretrain"]
    assert "## Host syncs and graph breaks" in md and "**no host sync and no graph break in any step**" in md
    assert md.split("## Failures")[1].strip() == "none"


def test_without_a_gpu_it_refuses_clearly(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA GeForce RTX 3090", 71.0), ("Tesla V100-SXM2-16GB", None), ("NVIDIA L40S", 362.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0), ("Some Future GPU", None),
])
def test_peak_table_reads_device_names(gpu_check, name: str, tflops: float | None) -> None:
    got, label = gpu_check.nominal_peak(name)
    assert got == tflops, (name, label)
    if name == "NVIDIA L40S":  # must not be taken for an L4
        assert label == "L40S"
    if name == "Some Future GPU":
        assert label == "unknown"
    if "V100" in name:
        assert "V100" in label


def test_goal_verdict(gpu_check) -> None:
    def verdict(gpu: str, img_s: float) -> dict:
        nominal, entry = gpu_check.nominal_peak(gpu)
        env = {"gpu": gpu, "nominal_bf16_tflops": nominal, "peak_table_entry": entry, "dry_run": False}
        return gpu_check.judge_goal({"environment": env, "pretrain_eager": {"img_s": img_s / 2},
                                     "pretrain_compiled": {"img_s": img_s}})
    met = verdict("NVIDIA H100 80GB HBM3", 1600.0)
    assert met["met"] is True and met["verdict"].startswith("MET") and met["best_row"] == "pretrain_compiled"
    missed = verdict("NVIDIA H100 80GB HBM3", 1400.0)
    assert missed["met"] is False and missed["verdict"].startswith("NOT MET")
    a100 = verdict("NVIDIA A100-SXM4-80GB", 500.0)
    assert "met" not in a100 and a100["goal_scaled_img_s"] == pytest.approx(1500 * 312 / 989)
    assert "meets" in a100["verdict"] and "estimate" in a100["verdict"]
    unknown = verdict("Some Future GPU", 900.0)
    assert unknown["verdict"].startswith("not judged")


def test_jpeg_decode_section_runs_the_device_path_on_the_cpu(gpu_check) -> None:
    """The ``jpeg_decode`` section in a dry run: the device path on the CPU (libjpeg-turbo, uint8
    resize) gives the CPU fast path's rgb exactly; its rates and its markdown are filled in."""
    setup = gpu_check.make_setup(gpu_check.parse_args(["--dry-run"]))
    r = gpu_check.section_jpeg_decode(setup, {}, lambda msg: None)
    assert r["max_abs_levels"] == 0.0 and r["pixels_over_1_level_pct"] == 0.0 and r["images"] == 16
    assert min(r["cpu_path_samples_per_cpu_s"], r["worker_samples_per_cpu_s"], r["device_samples_per_s"]) > 0
    md = "\n".join(gpu_check.jpeg_decode_md(r))
    assert "## JPEG decoding on the device (`data.decode=cuda`)" in md and "dry run" in md
