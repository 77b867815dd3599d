"""``train.loggers`` with Weights & Biases, in W&B offline mode: the run's project, name and config
and the same scalars as TensorBoard and metrics.jsonl, read back from the offline run's ``.wandb``
file; a resumed run continues the same W&B run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from multimae.engine.logging import RunLogger, WandbSettings, check_loggers

wandb = pytest.importorskip("wandb")  # the `test` extra installs it


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    yield tmp_path / "wandb-dir"
    wandb.teardown()  # wandb keeps one service and its settings per process


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (wandb's own Record schema; the file is a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of checksummed, possibly split chunks).
    wandb no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, buf = path.read_bytes(), [], b""
    assert data[:4] == b":W&B", path
    pos = 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def finished_records(f: Path, timeout_s: float = 120.0) -> list:
    """The records of ``f`` once W&B's service has written them all (its ``exit`` record): the
    service writes the file on its own time, also after ``run.finish()`` returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = wandb_records(f)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def read_run(wandb_dir: Path) -> dict:
    """project, name, id, config and step -> scalars over every offline run under ``wandb_dir``."""
    res: dict = {"history": {}, "config": {}, "ids": set()}
    wandb.teardown()  # shuts W&B's service down, so it writes out what it holds
    for f in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in finished_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                res.update(project=r.run.project, name=r.run.display_name)
                res["ids"].add(r.run.run_id)
                res["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                items = {k: json.loads(i.value_json) for i in r.history.item
                         for k in [i.key or "/".join(i.nested_key)] if not k.startswith("_")}
                res["history"].setdefault(int(r.history.step.num), {}).update(items)
    return res


def tensorboard_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            out.setdefault(e.step, {})[tag] = e.value
    return out


def test_wandb_offline_run_has_config_and_the_tensorboard_scalars(tmp_path, offline):
    run_dir = tmp_path / "run"
    settings = WandbSettings(project="proj", name="run-a", config={"train": {"lr": 0.001}, "model": {"depth": 2}})
    with RunLogger(run_dir, loggers=["tensorboard", "wandb"], wandb=settings) as log:
        log.log_scalars(1, {"loss": 1.5, "lr": 0.25})
        log.log_scalars(2, {"loss": 1.25, "lr": 0.5})
    time.sleep(1.1)  # W&B names an offline run's directory by the second and its id: a resume in the same second reuses it
    with RunLogger(run_dir, loggers=["tensorboard", "wandb"], wandb=settings) as log:  # resumed
        log.log_scalars(3, {"loss": 1.0, "lr": 0.5})
    got = read_run(offline)
    assert got["project"] == "proj" and got["name"] == "run-a"
    assert got["ids"] == {(run_dir / "wandb-id").read_text().strip()}  # the resume continued the same run
    assert got["config"]["train"] == {"lr": 0.001} and got["config"]["model"] == {"depth": 2}
    tb = tensorboard_scalars(run_dir)
    assert sorted(got["history"]) == sorted(tb) == [1, 2, 3]
    for step, values in tb.items():
        assert got["history"][step] == pytest.approx(values), step
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [got["history"][s]["loss"] for s in (1, 2, 3)]


def test_wandb_only_writes_no_tensorboard(tmp_path, offline):
    with RunLogger(tmp_path / "run", loggers=["wandb"], wandb=WandbSettings(project="p")) as log:
        log.log_scalars(5, {"loss": 2.0})
    assert not (tmp_path / "run" / "tb").exists()
    assert read_run(offline)["history"] == {5: {"loss": 2.0}}


def test_bad_loggers_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"train.loggers: unknown \['mlflow'\]"):
        check_loggers(["tensorboard", "mlflow"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'multimae\[wandb\]'"):
        check_loggers(["wandb"])


def test_pretraining_logs_to_wandb(tmp_path, offline):
    from multimae.core.config import load_config
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask
    from multimae.tasks.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", [
        "model.preset=nano", "model.depth=1", "model.image_size=32", "data.image_size=32", "data.num_samples=8",
        "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "train.batch_size=4", "train.max_steps=2",
        "train.log_every=1", "train.figure_at_end=false", "train.loggers=[tensorboard, wandb]",
        "train.wandb_project=mm-test", f"train.out_dir={tmp_path}", "train.run_name=wb"])
    Trainer(PretrainTask(cfg)).fit(evaluate=False)
    got = read_run(offline)
    assert got["project"] == "mm-test" and got["name"] == "wb"
    assert got["config"]["model"]["preset"] == "nano" and got["config"]["train"]["max_steps"] == 2
    jsonl = {r["step"]: r for r in map(json.loads, (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(got["history"]) == sorted(jsonl) == [1, 2]
    for step, hist in got["history"].items():
        scalars = {k: v for k, v in hist.items() if not k.startswith("reconstruction/")}  # the figure at the end
        assert scalars == {k: v for k, v in jsonl[step].items() if k not in ("step", "time")}
    assert got["history"][2]["reconstruction/_type"] == "image-file"  # logged as TensorBoard logs it
