"""Checkpoint directories: exact round trip, atomic writes, pruning, safe loading, RNG state."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import multimae.checkpoint.io as ckio
from multimae.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
    save_file_atomic,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


def train_some(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make_state(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": step, "epoch": 0,
            "data": {"position": step * 16}}


def save(run: Path, step: int, **kw) -> Path:
    m = Toy()
    return save_checkpoint(run, step, m.state_dict(), {"step": step}, {"config": {"a": 1}}, **kw)


def test_round_trip_and_exact_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_some(model, opt, 3)
    path = save_checkpoint(tmp_path, 3, model.state_dict(), make_state(model, opt, 3),
                           {"config": {"lr": 1e-2}, "epoch": 0})
    assert path == tmp_path / "checkpoints" / "step-000000003"
    expected = train_some(model, opt, 4)  # continue uninterrupted

    weights, state, meta = load_checkpoint(tmp_path)  # run dir -> latest
    assert meta["step"] == 3 and meta["epoch"] == 0 and meta["config"] == {"lr": 1e-2}
    assert meta["format_version"] == FORMAT_VERSION and "library_version" in meta
    model2 = Toy()
    model2.load_state_dict(weights)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    assert state["data"] == {"position": 48}
    resumed = train_some(model2, opt2, 4)
    assert resumed == expected  # bit-exact: same weights, optimizer moments and RNG stream
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "row": base[1]}
    save_checkpoint(tmp_path, 1, state, {}, {})
    w = load_weights(tmp_path)
    for k, v in state.items():
        assert torch.equal(w[k], v), k
    assert load_weights(find_latest(tmp_path) / "model.safetensors").keys() == w.keys()


def test_crash_mid_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save(tmp_path, 10)

    def broken_save(obj: object, f: object) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckio.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 20)
    monkeypatch.undo()
    assert find_latest(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    assert not (tmp_path / "checkpoints" / "step-000000020").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]
    _, state, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 10 and state == {"step": 10}


def test_full_disk_is_one_line_naming_the_path_and_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save(tmp_path, 10)

    def full(obj: object, f: object) -> None:  # what torch.save says when the disk fills up
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    monkeypatch.setattr(ckio.torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        save(tmp_path, 20)
    msg = str(e.value)
    assert "\n" not in msg and "step-000000020" in msg and "MiB free" in msg and "inline_container" not in msg
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [first]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_follow_the_users_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        d = save(tmp_path, 3)
        extra = ckio.save_file_atomic(tmp_path / "w.safetensors",
                                      lambda p: ckio._st_save_file({"a": torch.zeros(2)}, str(p)))
    finally:
        os.umask(old)
    for f in [*d.iterdir(), extra]:  # safetensors alone would make 0600: unreadable by the group
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_incomplete_and_temp_dirs_ignored(tmp_path: Path) -> None:
    first = save(tmp_path, 5)
    root = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = root / f".tmp-step-000000099-{int(dead.stdout)}@{host}-deadbeef"  # left by a killed writer
    stale.mkdir()
    live = root / f".old-step-000000098-{os.getppid()}@{host}-0badcafe"  # another process still writing
    live.mkdir()
    half = root / "step-000000050"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")  # no meta.json
    bad = root / "step-000000060"
    bad.mkdir()
    for name in ("model.safetensors", "state.pt"):
        (bad / name).write_bytes(b"x")
    (bad / "meta.json").write_text("{trunc")
    assert find_latest(tmp_path) == first
    assert find_latest(root) == first  # the checkpoints dir works too
    save(tmp_path, 7)
    assert not stale.exists() and live.is_dir()  # a dead writer's temp is cleaned, a live one's kept


def test_keep_last_pruning(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4, 5):
        save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004", "step-000000005"]
    for s in (6, 7):
        save(tmp_path, s, keep_last=0)
    assert len(list_checkpoints(tmp_path)) == 4


def test_a_kill_while_pruning_leaves_no_broken_step_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 1)
    real = ckio.shutil.rmtree

    def killed(path: object, *a: object, **kw: object) -> None:  # the process dies half-way through deleting
        (Path(path) / "model.safetensors").unlink()
        raise SystemExit(137)

    monkeypatch.setattr(ckio.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        save(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(ckio.shutil, "rmtree", real)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-000000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002"]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"v": 1}, {})
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"v": 2}, {})
    w, state, _ = load_checkpoint(tmp_path)
    assert torch.equal(w["w"], torch.ones(2)) and state == {"v": 2}
    assert len(list(Path(tmp_path, "checkpoints").iterdir())) == 1


def test_state_must_be_weights_only_loadable(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"train_state\['rng'\]\['np'\].*ndarray"):
        save_checkpoint(tmp_path, 1, {}, {"rng": {"np": np.zeros(3)}}, {})
    assert find_latest(tmp_path) is None
    # state.pt written by hand with a pickled object is refused on load, not executed
    path = save(tmp_path, 2)
    torch.save({"obj": Toy()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(path)


def test_future_version_missing_and_corrupt(tmp_path: Path) -> None:
    path = save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*newer"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="newer"):
        load_weights(path)

    path = save(tmp_path, 2)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"corrupt weights file .*step-000000002"):
        load_checkpoint(path)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing .*state.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist.*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint found in .*empty"):
        load_checkpoint(tmp_path / "empty")


def test_train_state_is_read_without_the_weights(tmp_path: Path) -> None:
    """An FSDP resume reads the state and meta alone (its weights come from the shards)."""
    from multimae.checkpoint import read_train_state

    path = save(tmp_path, 3)
    (path / "model.safetensors").write_bytes(b"\x00garbage")  # never opened
    state, meta = read_train_state(path)
    assert state["step"] == 3 and meta["step"] == 3
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        load_checkpoint(path)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing .*state.pt"):
        read_train_state(path)


def test_save_file_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    save_file_atomic(target, lambda p: p.write_text("v1"))
    assert target.read_text() == "v1"

    def crash(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_file_atomic(target, crash)
    assert target.read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.gauss(0, 1)  # populate python's cached gaussian
    np.random.standard_normal()
    state = capture_rng_state()
    ref = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    torch.rand(5), np.random.rand(5), random.random()  # advance
    restore_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(ref[0], again[0])
    assert np.array_equal(ref[1], again[1])
    assert ref[2:] == again[2:]
