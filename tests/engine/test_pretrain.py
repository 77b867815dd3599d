"""The pretraining engine end to end on tiny synthetic runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.core.config import load_config
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask

TINY = [
    "model.preset=nano", "model.depth=2", "model.image_size=32", "model.patch_size=8",
    "model.modalities={semseg: {num_classes: 6}}", "data.image_size=32", "data.num_samples=64",
    "data.val_samples=8", "data.num_workers=0", "mask.num_visible=12", "optim.lr=2e-3", "optim.warmup_steps=2",
    "train.batch_size=8", "train.epochs=4", "train.log_every=2", "train.figure_at_end=false",
]


def cfg_for(tmp_path, *extra):
    return load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",
                       TINY + [f"train.out_dir={tmp_path}", *extra])


def test_loss_falls_on_synthetic_scenes(tmp_path):
    cfg = cfg_for(tmp_path, "train.run_name=fall", "train.epochs=8", "data.num_samples=128")
    run = Trainer(PretrainTask(cfg)).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert {"loss/rgb", "loss/depth", "loss/semseg", "lr", "grad_norm"} <= set(rows[-1])
    assert (run / "tb").is_dir() and any((run / "tb").iterdir())


def test_resume_continues_exactly(tmp_path):
    full = Trainer(PretrainTask(cfg_for(tmp_path, "train.run_name=a", "train.max_steps=10", "train.ckpt_every=100"))).fit()
    Trainer(PretrainTask(cfg_for(tmp_path, "train.run_name=b", "train.max_steps=5", "train.ckpt_every=100"))).fit()
    resumed = Trainer(PretrainTask(cfg_for(tmp_path, "train.run_name=b", "train.max_steps=10", "train.ckpt_every=100")))
    assert resumed.step == 5
    resumed.fit()
    wa, wb = load_weights(find_latest(full)), load_weights(find_latest(tmp_path / "b"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and the run did change the weights (the check above cannot pass vacuously)
    init = Trainer(PretrainTask(cfg_for(tmp_path, "train.run_name=c", "train.max_steps=0", "train.resume=null"))).model.state_dict()
    assert not torch.equal(init["encoder.0.attn.qkv.weight"], wa["encoder.0.attn.qkv.weight"])


def test_accumulation_matches_a_big_batch(tmp_path):
    """2 micro-batches of 4 accumulate to the gradient of the batch of 8 they came from."""
    from multimae.engine.step import train_step

    cfg = cfg_for(tmp_path, "train.run_name=acc")
    tr = Trainer(PretrainTask(cfg))
    batch, plan = next(iter(tr.loader))
    model = tr.model
    halves = [({k: v[s] for k, v in batch.items() if isinstance(v, torch.Tensor)}, plan.__class__({k: m[s] for k, m in plan.masks.items()}))
              for s in (slice(0, 4), slice(4, 8))]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, halves, opt)
    acc = {n: p.grad.clone() for n, p in model.named_parameters()}
    train_step(model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, opt, plan)
    for n, p in model.named_parameters():
        assert torch.allclose(acc[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_config_errors_name_the_key(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "multimae.cli.main", "pretrain", "--config",
                        "configs/pretrain/synthetic-tiny.yaml", "optim.lrr=1"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "optim.lr" in r.stderr
    r = subprocess.run([sys.executable, "-m", "multimae.cli.main", "pretrain", "--config",
                        "configs/pretrain/synthetic-tiny.yaml", "train.batch_size=many"], capture_output=True, text=True)
    assert r.returncode == 2 and "train.batch_size" in r.stderr


def test_non_finite_loss_is_reported(tmp_path):
    from multimae.engine.step import NonFiniteLossError, train_step

    tr = Trainer(PretrainTask(cfg_for(tmp_path, "train.run_name=nan")))
    batch, plan = next(iter(tr.loader))
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batch["depth"] = batch["depth"].clone()
    batch["depth"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7: \{'depth'"):
        train_step(tr.model, batch, tr.optimizer, plan, step=7, nonfinite="raise")


def test_pretrain_streams_webdataset_shards(tmp_path):
    """data.source=shards: every rank takes the configured number of steps from tar shards."""
    from multimae.data.shards import write_shards
    from multimae.data.synthetic import SyntheticScenes

    ds = SyntheticScenes(48, image_size=32, seed=3, modalities=["rgb", "depth", "semseg"])
    urls = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "shard-%06d.tar"), max_count=16)
    assert len(urls) == 3
    cfg = cfg_for(tmp_path, "train.run_name=shards", "data.source=shards", f"data.urls={','.join(urls)}",
                  "data.num_samples=48", "data.shuffle_buffer=16", "train.epochs=2", "train.eval_at_end=false")
    tr = Trainer(PretrainTask(cfg))
    assert tr.steps_per_epoch == 6
    run = tr.fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and all(r["loss"] > 0 for r in rows)


def test_shard_epoch_is_what_the_shards_hold(tmp_path, capsys):
    """data.num_samples unset: the epoch is the samples counted in the shards (96 here, not 4096),
    recorded in the run config and said in the run log; remote shards need data.num_samples."""
    from multimae.cli.main import main
    from multimae.data.errors import DataError
    from multimae.data.shards import write_shards
    from multimae.data.synthetic import SyntheticScenes

    ds = SyntheticScenes(24, image_size=32, seed=3, modalities=["rgb", "depth", "semseg"])
    urls = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "shard-%06d.tar"), max_count=10)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    cfg = cfg_for(tmp_path, "train.run_name=count", "data.source=shards", f"data.urls={pattern}",
                  "data.num_samples=null", "data.shuffle_buffer=8", "train.batch_size=4", "train.epochs=2")
    task = PretrainTask(cfg)
    assert task.cfg.data.num_samples == 24
    tr = Trainer(task)
    assert tr.steps_per_epoch == 6 and tr.total_steps == 12
    assert "epoch: 24 samples (counted in the shards" in "\n".join(task.describe(tr))
    told = PretrainTask(cfg_for(tmp_path, "data.source=shards", f"data.urls={pattern}", "data.num_samples=8",
                                "train.batch_size=4"))
    assert told.cfg.data.num_samples == 8 and "(data.num_samples;" in told._epoch_line()[0]
    with pytest.raises(DataError, match="remote and its samples are not counted; set data.num_samples"):
        PretrainTask(cfg_for(tmp_path, "data.source=shards", "data.urls=https://example.org/s-{0..3}.tar",
                             "data.num_samples=null"))
    rc = main(["pretrain", "--config", "configs/pretrain/synthetic-tiny.yaml", *TINY, "data.source=shards",
               f"data.urls={urls[0]}", "data.num_samples=null", "train.batch_size=64", f"train.out_dir={tmp_path}",
               "train.run_name=few"])
    err = capsys.readouterr().err
    assert rc == 2 and "an epoch of 10 samples" in err and "less than one batch of 64" in err
