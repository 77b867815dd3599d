"""The package travels without the repository: a wheel built from the project, installed into a
fresh virtual environment beside the pinned torch, runs a documented command from an empty directory."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from multimae.core.config import ConfigError, packaged_configs, resolve_config_path

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[2]


def test_configs_resolve_by_name_path_and_repo_path(tmp_path, monkeypatch):
    tiny = resolve_config_path("synthetic-tiny")
    assert tiny.name == "synthetic-tiny.yaml" and tiny.parent.name == "pretrain"
    assert resolve_config_path("pretrain/synthetic-tiny") == tiny
    monkeypatch.chdir(tmp_path)  # the README's repository path works from any directory
    assert resolve_config_path("configs/pretrain/synthetic-tiny.yaml").samefile(tiny)
    (tmp_path / "mine.yaml").write_text("train: {max_steps: 1}\n")
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")  # a file always wins
    with pytest.raises(ConfigError, match="not a shipped config: .*pretrain/synthetic-tiny"):
        resolve_config_path("synthetic-tinyy")


def test_every_kind_directory_is_picked_up(tmp_path):
    for kind, name in (("pretrain", "a"), ("finetune", "a"), ("finetune", "b")):
        (tmp_path / kind).mkdir(exist_ok=True)
        (tmp_path / kind / f"{name}.yaml").write_text("{}\n")
    assert resolve_config_path("b", root=tmp_path) == tmp_path / "finetune" / "b.yaml"
    assert resolve_config_path("a", kind="pretrain", root=tmp_path) == tmp_path / "pretrain" / "a.yaml"
    with pytest.raises(ConfigError, match="ambiguous: pretrain/a, finetune/a|ambiguous: finetune/a, pretrain/a"):
        resolve_config_path("a", root=tmp_path)
    assert set(packaged_configs(tmp_path)) == {"a", "b", "pretrain/a", "finetune/a", "finetune/b"}


def _copy_project(dst: Path) -> Path:
    """The files a wheel is built from (not the working tree's build leftovers)."""
    dst.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / f, dst / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "configs", dst / "configs", ignore=ignore)
    shutil.copytree(REPO / "src", dst / "src", symlinks=True, ignore=ignore)
    return dst


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_wheel_in_a_fresh_venv_runs_pretrain_from_an_empty_directory(tmp_path):
    project = _copy_project(tmp_path / "project")
    _run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist")])
    wheel = next((tmp_path / "dist").glob("multimae-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # torch & co. from the main environment through a plain path line (its .pth files, among them
    # the editable install of this checkout, are not processed this way)
    main_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_main_env.pth").write_text("\n".join(sorted(main_site)) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-compile",
          str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(py), "-c", "import multimae, multimae.core.config as c; print(multimae.__file__); "
                  "print(c.resolve_config_path('synthetic-tiny'))"], cwd=empty, env=env).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site)), where
    assert (site / "multimae" / "configs" / "pretrain" / "synthetic-tiny.yaml").is_file()
    res = _run([str(venv / "bin" / "multimae"), "pretrain", "--config", "synthetic-tiny", "train.max_steps=2",
                # small data so the check stays fast; the command is the documented one
                "data.num_samples=64", "data.val_samples=4", "data.num_workers=0", "data.cache=false",
                "train.batch_size=4"],
               cwd=empty, env=env, timeout=600)
    assert "run directory:" in res.stdout
    assert list((empty / "runs" / "synthetic-tiny" / "checkpoints").glob("step-000000002"))
