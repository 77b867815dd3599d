"""Fixtures of the demo tests: a tiny random-init run saved as a checkpoint, its engine, a server."""
from __future__ import annotations

import os
import select
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from multimae.checkpoint import save_checkpoint
from multimae.core.config import to_dict
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.tasks.pretrain_config import PretrainConfig



HEADER_TIMEOUT = 2.0  # the test server's deadline for a request head (the default is 10 s)


def need_demo_extra() -> None:
    """Skip without the 'demo' extra; in CI (CI=true, where make test installs it) fail instead."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the demo extra is missing in CI ({e.name}): make test installs '.[test,demo]'")
        pytest.skip(f"the demo extra is not installed ({e.name}): pip install -e '.[demo]'")


def tiny_run(root, image_size: int = 32):
    """A run directory holding one checkpoint of a random-init nano MultiMAE (rgb, depth, semseg)."""
    cfg = PretrainConfig()
    cfg.model = ModelConfig(preset="nano", depth=1, decoder_depth=1, image_size=image_size, patch_size=8,
                            modalities={"semseg": {"num_classes": 6}})
    cfg.data.image_size = image_size
    cfg.mask.num_visible = 12
    torch.manual_seed(0)
    model = MultiMAE(cfg.model)
    save_checkpoint(root, 1, model.state_dict(), {"step": 1}, {"config": to_dict(cfg)})
    return root


def tiny_m3ae_run(root, image_size: int = 32):
    """A run directory of a random-init nano M3AE (rgb + caption, shared decoder), the
    synthetic-m3ae-tiny config made small."""
    from multimae.core.config import load_config
    from multimae.tasks.pretrain import completed_config

    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-m3ae-tiny.yaml",
                      ["model.preset=nano", "model.depth=1", f"model.image_size={image_size}", "model.patch_size=8",
                       "model.decoder_depth=1", f"data.image_size={image_size}"])
    cfg = completed_config(cfg)
    torch.manual_seed(0)
    model = MultiMAE(cfg.model)
    save_checkpoint(root, 1, model.state_dict(), {"step": 1}, {"config": to_dict(cfg)})
    return root


@pytest.fixture(scope="session")
def m3ae_engine(tmp_path_factory):
    need_demo_extra()
    from multimae.apps.demo import engine_from_checkpoint

    return engine_from_checkpoint(tiny_m3ae_run(tmp_path_factory.mktemp("demo-m3ae") / "m3ae"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("demo-run") / "tiny")


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory):
    """A folder dataset (val split) of two synthetic scenes with rgb and depth only (no semseg)."""
    from multimae.data.folder import write_folder
    from multimae.data.synthetic import generate

    root = tmp_path_factory.mktemp("demo-folder")
    samples = [{k: v for k, v in generate(5, i, 40).items() if k in ("rgb", "depth", "__key__")} for i in range(2)]
    write_folder(samples, root, "val")
    return root


@pytest.fixture(scope="session")
def engine(run_dir, folder_root):
    need_demo_extra()
    from multimae.apps.demo import Limits, engine_from_checkpoint

    # small limits keep the oversize checks fast
    return engine_from_checkpoint(run_dir, data=folder_root,
                                  limits=Limits(max_upload_bytes=1 << 20, max_pixels=4_000_000, max_side=256))


@pytest.fixture(scope="session")
def server(engine):
    from multimae.apps.demo.app import serving

    with serving(engine, header_timeout=HEADER_TIMEOUT) as url:
        yield url


@pytest.fixture(scope="session")
def header_timeout():
    return HEADER_TIMEOUT


@pytest.fixture(scope="session")
def cli_server(run_dir, engine):  # engine: needs the demo extra
    """``multimae demo`` in a subprocess on a free port: its pid, first stdout line and URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multimae.cli.main", "demo", "--checkpoint", str(run_dir),
                             "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 240)  # never hang the suite
        assert ready, "multimae demo printed nothing within 240 s"
        line = proc.stdout.readline()
        assert line.startswith("multimae demo: http://"), (line, proc.stderr.read() if proc.poll() else "")
        yield SimpleNamespace(pid=proc.pid, line=line, url=line.split()[2])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
