"""Runs that never lose work, through the CLI as a user (or a cluster) runs it: a resume continues
only the same run, a signal saves and exits 75 and the same command continues bit for bit, one
process writes a run, non-finite weights are never saved, files follow the user's umask."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multimae.checkpoint import find_latest, list_checkpoints, load_weights
from tiny import TINY_OVERRIDES

STEPS = 16
SMALL = ["--no-eval", *TINY_OVERRIDES, "data.num_samples=16", "data.num_workers=0", "data.cache=false",
         "mask.num_visible=12", "optim.lr=1e-3", "optim.warmup_steps=2", "train.batch_size=4", "train.ckpt_every=4",
         "train.log_every=1", "train.figure_at_end=false", f"train.max_steps={STEPS}"]
# torchrun restarts: a fresh rendezvous store each round (pytorch/pytorch#135712: the shared one hands the
# restarted ranks the addresses of the dead ones)
ENV = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def _cmd(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "multimae.cli.main", "pretrain", "--config", "configs/pretrain/synthetic-tiny.yaml",
            *SMALL, f"train.out_dir={out}", f"train.run_name={name}", *extra]


def _umask022() -> None:
    os.umask(0o022)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, preexec_fn=_umask022)


def interrupt(cmd: list[str], sig: int, after_line: str = "step ", kill_child: bool = False
              ) -> tuple[int, str]:
    """Start ``cmd``, wait for a progress line, wait a random moment, send ``sig`` (to the process,
    or to one of its children: a torchrun rank); returns (exit status, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    assert p.stderr is not None
    for line in p.stderr:
        lines.append(line)
        if line.startswith(after_line):
            break
    time.sleep(random.uniform(0.0, 0.05))
    target = p.pid
    if kill_child:
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        target = int(random.choice(children))
    os.kill(target, sig)
    err = "".join(lines) + p.stderr.read()
    return p.wait(timeout=600), err


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_weights(find_latest(a)), load_weights(find_latest(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def uninterrupted(tmp_path_factory, folder: str, command) -> Path:
    """The run ``command(out, "ref")`` makes, run to its end without a signal."""
    out = tmp_path_factory.mktemp(folder)
    r = run(command(out, "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "ref"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    return uninterrupted(tmp_path_factory, "ref", _cmd)


def test_signals_save_and_the_same_command_continues_bitwise(reference, tmp_path):
    cmd = _cmd(tmp_path, "cut")
    stops = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # SLURM's warning, then scancel / kill
        rc, err = interrupt(cmd, sig)
        assert rc == 75, err[-3000:]
        m = re.search(rf"stopped: {signal.Signals(sig).name}: stopped at step (\d+), saved", err)
        assert m, err[-2000:]
        step = int(m.group(1))
        assert find_latest(tmp_path / "cut").name == f"step-{step:09d}"  # a checkpoint at that very step
        stops.append(step)
    assert 0 < stops[0] < stops[1] < STEPS
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_weights(reference, tmp_path / "cut")
    assert logged_steps(tmp_path / "cut") == logged_steps(reference) == list(range(1, STEPS + 1))  # each once
    for f in (tmp_path / "cut" / "config.json", *find_latest(tmp_path / "cut").iterdir()):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # readable by the group under umask 022


def test_another_model_data_or_objective_is_refused_in_one_line(reference):
    before = {p.name: p.stat().st_mtime_ns for p in (reference / "checkpoints").iterdir()}
    config = (reference / "config.json").read_bytes()
    out, name = str(reference.parent), reference.name
    r = run(_cmd(Path(out), name, "model.depth=2", "data.source=folder", f"data.root={out}"))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    for needed in ("model.depth: 1 -> 2", "data.source: 'synthetic' -> 'folder'", "train.run_name=",
                   "train.resume=force"):
        assert needed in line, line
    assert (reference / "config.json").read_bytes() == config  # nothing rewritten, no step taken
    assert {p.name: p.stat().st_mtime_ns for p in (reference / "checkpoints").iterdir()} == before
    # schedule-only changes (a longer run, other intervals) continue it
    r = run(_cmd(Path(out), name, f"train.max_steps={STEPS + 1}", "train.log_every=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert find_latest(reference).name == f"step-{STEPS + 1:09d}"


def test_a_run_held_by_another_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from multimae.engine.identity import acquire_lock; acquire_lock(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path / "busy")],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run(_cmd(tmp_path, "busy"))
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2
    assert f"process {holder.pid}" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
    assert not (tmp_path / "busy" / "checkpoints").exists()


def test_huge_lr_stops_naming_the_step_and_saves_only_finite_weights(tmp_path):
    # the warm-up reaches an infinite update at its second step; step 1 is checkpointed, finite
    r = run(_cmd(tmp_path, "nan", "optim.lr=1e39", "optim.warmup_steps=2", "optim.warmup_lr=1e-3",
                 "train.ckpt_every=1"))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not finite" in last and "step 2" in last, r.stderr[-2000:]
    ckpts = list_checkpoints(tmp_path / "nan")
    assert [p.name for p in ckpts] == ["step-000000001"]
    assert all(bool(torch.isfinite(w).all()) for w in load_weights(ckpts[-1]).values())


def test_config_value_errors_are_one_line_naming_the_key(tmp_path):
    r = run(_cmd(tmp_path, "bad", "optim.lr=-1"))
    assert r.returncode == 2 and "optim.lr=-1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _torchrun(out: Path, name: str, *launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *launcher,
            *_cmd(out, name)[1:]]


@pytest.fixture(scope="module")
def reference2(tmp_path_factory) -> Path:
    """An uninterrupted 2-process (gloo, CPU) run."""
    return uninterrupted(tmp_path_factory, "ref2", _torchrun)


def test_torchrun_signal_every_rank_stops_at_one_step_and_continues_bitwise(reference2, tmp_path):
    cmd = _torchrun(tmp_path, "cut")
    rc, err = interrupt(cmd, signal.SIGTERM)  # what scancel does to the launcher: it passes it on to the ranks
    assert rc != 0
    m = re.search(r"stopped: SIGTERM: stopped at step (\d+), saved", err)
    assert m, err[-3000:]
    assert find_latest(tmp_path / "cut").name == f"step-{int(m.group(1)):09d}"
    assert int(m.group(1)) < STEPS
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_weights(reference2, tmp_path / "cut")


def test_torchrun_elastic_restart_after_a_killed_rank_finishes_bitwise(reference2, tmp_path):
    cmd = _torchrun(tmp_path, "elastic", "--max-restarts=1")
    rc, err = interrupt(cmd, signal.SIGKILL, after_line="step 5/", kill_child=True)
    assert rc == 0, err[-3000:]
    assert "exitcode: -9" in err, err[-3000:]  # the agent saw the killed rank and restarted the job
    assert same_weights(reference2, tmp_path / "elastic")
    assert logged_steps(tmp_path / "elastic") == logged_steps(reference2)  # rows of the lost steps dropped


def test_skip_mode_skips_a_bad_update_counts_it_and_goes_on(tmp_path):
    from multimae.core.config import load_config
    from multimae.engine.trainer import Trainer
    from multimae.tasks.pretrain import PretrainTask
    from multimae.tasks.pretrain_config import PretrainConfig

    over = [o for o in SMALL[1:] if not o.startswith(("train.max_steps", "train.log_every"))]
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", over + [
        f"train.out_dir={tmp_path}", "train.run_name=skip", "train.nonfinite=skip", "train.nonfinite_max_skips=2",
        "train.max_steps=4", "train.log_every=4", "train.eval_at_end=false"])
    tr = Trainer(PretrainTask(cfg))
    batches = tr.batches

    def one_bad_batch():
        for i, group in enumerate(batches()):
            if i in (1, 3):  # two bad batches, not in a row
                group[0][0].tensors["depth"][0, 0, 0, 0] = float("nan")
            yield group

    tr.batches = one_bad_batch
    tr.fit(evaluate=False)
    row = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and row["skipped_steps"] == 2
    assert all(bool(torch.isfinite(w).all()) for w in load_weights(find_latest(tmp_path / "skip")).values())


def test_a_second_ctrl_c_exits_at_once():
    from multimae.engine.signals import StopSignals

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under nohup or `cmd &`
    with StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1 and stop.agreed()  # the first: noted, the loop goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_stats_are_read_only_at_log_and_checkpoint_steps_and_throughput_is_per_step(tmp_path, monkeypatch):
    import types

    import multimae.engine.trainer as T
    from multimae.core.config import load_config
    from multimae.tasks.pretrain import PretrainTask
    from multimae.tasks.pretrain_config import PretrainConfig

    over = [o for o in SMALL[1:] if not o.startswith(("train.max_steps", "train.log_every", "train.ckpt_every"))]
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml", over + [
        f"train.out_dir={tmp_path}", "train.run_name=reads", "train.max_steps=7", "train.log_every=3",
        "train.ckpt_every=100", "train.eval_at_end=false"])
    tr = T.Trainer(PretrainTask(cfg))
    reads, real = [], T.read_stats
    monkeypatch.setattr(T, "read_stats", lambda stats: reads.append(tr.step) or real(stats))
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: float(tr.step)))  # 1 s per step
    tr.fit(evaluate=False)
    assert reads == [3, 6, 7]  # log steps and the last (a checkpoint): no host read in between
    rows = [json.loads(line) for line in (tmp_path / "reads" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["imgs_per_s"] for r in rows] == [4.0, 4.0, 4.0]  # the last row: 1 step in 1 s, not log_every
