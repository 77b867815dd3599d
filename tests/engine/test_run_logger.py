"""RunLogger (JSON lines + TensorBoard) and Progress (bar on a TTY, plain lines otherwise)."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multimae.engine.logging import Progress, RunLogger


def test_jsonl_lines_and_tensorboard(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "run") as log:
        log.log_scalars(1, {"loss": torch.tensor(0.5), "lr": 1e-4})
        log.log_scalars(2, {"loss": np.float32(0.25), "loss/rgb": 0.1})
        # each line is on disk as soon as it is logged
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
        log.log_image(2, "pred", torch.rand(3, 8, 8))
        log.log_image(2, "depth", torch.randint(0, 255, (8, 8), dtype=torch.uint8))
    recs = [json.loads(line) for line in lines]
    assert recs[0]["step"] == 1 and recs[0]["loss"] == 0.5 and recs[0]["lr"] == 1e-4
    assert recs[1] == {**recs[1], "step": 2, "loss/rgb": 0.1}
    assert all(isinstance(r["time"], float) for r in recs)
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    with RunLogger(tmp_path / "run", tensorboard=False) as log:  # appends
        log.log_scalars(3, {"loss": 0.2})
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_values(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="'loss' has shape"):
            log.log_scalars(0, {"loss": torch.ones(2)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            log.log_scalars(0, {"step": 1})
        with pytest.raises(ValueError, match="'name' must be a number"):
            log.log_scalars(0, {"name": "x"})
        with pytest.raises(ValueError, match=r"'img'.*\(2, 4, 4\)"):
            log.log_image(0, "img", torch.zeros(2, 4, 4))


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "r1", enabled=False) as log:
        log.log_scalars(0, {"loss": 1.0})
        log.log_image(0, "x", torch.zeros(3, 2, 2))
    assert not (tmp_path / "r1").exists()


def test_missing_tensorboard_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kw: object) -> object:
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with RunLogger(tmp_path) as log:
        with pytest.warns(UserWarning, match="TensorBoard logging disabled") as rec:
            log.log_scalars(0, {"loss": 1.0})
            log.log_scalars(1, {"loss": 0.5})
        assert len(rec) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tb").exists()


def test_progress_plain_lines() -> None:
    out = io.StringIO()  # not a TTY -> plain lines
    with Progress(total_steps=10, initial=2, log_every=4, stream=out) as p:
        assert not p.is_bar
        for _ in range(8):
            p.update(1, loss=0.1234567, lr=1e-4, imgs=32)
        assert p.images_per_sec is not None and p.images_per_sec > 0
    lines = out.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 4/10 (40.0%)", "step 8/10 (80.0%)",
                                                  "step 10/10 (100.0%)"]
    assert "loss 0.1235" in lines[0] and "lr 1.00e-04" in lines[0]
    assert "img/s" in lines[-1] and "eta 0:00:00" in lines[-1]


def test_progress_bar_on_tty_and_disabled() -> None:
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = TTY()
    with Progress(total_steps=5, stream=out) as p:
        assert p.is_bar
        for _ in range(5):
            p.update(1, loss=0.5, lr=1e-3, imgs=8)
    assert "loss=0.5000" in out.getvalue() and "5/5" in out.getvalue()

    quiet = io.StringIO()
    with Progress(total_steps=5, enabled=False, log_every=1, stream=quiet) as p:
        p.update(5, loss=1.0)
    assert quiet.getvalue() == "" and p.step == 5
