"""``multimae submit`` end to end with submitit's local executor on the CPU: a pretraining job that
is signalled (SIGUSR1, SLURM's warning before the time limit) mid-run, requeued by submitit and
resumed, finishes with the weights of an uninterrupted run, bit for bit."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.cli.main import main
from multimae.cli.submit import submit_command
from multimae.engine.slurm import SlurmConfig, distributed_env

pytestmark = pytest.mark.multiprocess

pytest.importorskip("submitit")  # the `test` extra installs it
ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def command(out: Path, name: str) -> list[str]:
    return ["pretrain", "--config", str(ROOT / "configs/pretrain/synthetic-tiny.yaml"), "--no-eval",
            "model.preset=nano", "model.depth=1", "model.image_size=32", "model.drop_path=0.1", "data.image_size=32",
            "data.num_samples=64", "data.num_workers=0", "data.cache=false", "mask.num_visible=12",
            "train.batch_size=4", f"train.max_steps={STEPS}", "train.ckpt_every=3", "train.keep_last=2",
            "train.log_every=1", "train.figure_at_end=false", f"train.out_dir={out}", f"train.run_name={name}"]


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def signal_tasks(job, sig: int) -> None:
    """Send ``sig`` to every task of a local job (the children of submitit's local controller; its
    own ``_interrupt`` signals the controller, which does not pass USR1 on)."""
    pid = job._process.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(child), sig)


def test_local_job_signalled_requeued_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    job = submit_command(command(tmp_path, "job"), SlurmConfig(local=True, gpus_per_node=0, cpus_per_task=1, time_min=10,
                                                       folder=str(tmp_path / "slurm")))
    deadline = time.monotonic() + 240
    while logged_steps(tmp_path / "job") < 4:  # signal it mid-run, after a periodic checkpoint
        assert job.state not in ("DONE", "FAILED") and time.monotonic() < deadline, (job.state, job.stderr())
        time.sleep(0.02)
    signal_tasks(job, signal.SIGUSR1)  # what SLURM's --signal=USR1@<delay> does
    assert job.result() == 0, job.stderr()
    log = (job.stdout() or "") + (job.stderr() or "")
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and 3 <= resumed[0] < STEPS, log[-3000:]  # requeued once, continued mid-run
    steps = [json.loads(x)["step"] for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == STEPS

    torch.set_num_threads(1)
    assert main(command(tmp_path, "ref")) == 0  # the same run, uninterrupted
    a, b = find_latest(tmp_path / "ref"), find_latest(tmp_path / "job")
    assert a.name == b.name
    wa, wb = load_weights(a), load_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_submit_refuses_what_it_cannot_run(tmp_path, capsys):
    assert main(["submit", "--local", "--folder", str(tmp_path), "--", "predict", "x"]) == 2
    assert "error: multimae submit runs a training command" in capsys.readouterr().err
    with pytest.raises(ValueError, match="runs a training command"):
        submit_command(["predict", "x"], SlurmConfig(local=True, folder=str(tmp_path)))
    with pytest.raises(ValueError, match="nodes=0"):
        submit_command(command(tmp_path, "x"), SlurmConfig(local=True, nodes=0, folder=str(tmp_path)))


def test_distributed_env_of_a_task():
    env = SimpleNamespace(num_tasks=16, num_nodes=2, global_rank=9, local_rank=1, job_id="4242_3",
                          hostnames=["gpu-a", "gpu-b"])
    assert distributed_env(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                    "MASTER_ADDR": "gpu-a", "MASTER_PORT": str(20000 + 42423 % 20000)}
    assert distributed_env(SimpleNamespace(num_tasks=1)) == {}  # one process: no process group


def test_sbatch_script_has_the_resources_and_usr1(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmExecutor

    from multimae.engine.slurm import _executor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine

    ex = _executor(SlurmConfig(nodes=2, gpus_per_node=8, partition="gpu", account="proj", time_min=4320,
                               signal_delay_s=180, folder=str(tmp_path)))
    text = ex._executor._make_submission_file_text("python -m x", "UUID")
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--account=proj",
                 "--time=4320", "--signal=USR1@180"):
        assert f"#SBATCH {line}" in text, (line, text)
