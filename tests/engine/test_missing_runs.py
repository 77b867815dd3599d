"""Pretraining on an incomplete folder dataset (data.missing=allow): half the samples lack depth,
a third lack semseg. Training runs and logs how many samples each task's loss covered, the depth
loss is the one computed by hand over the samples that have depth, and resume is bitwise."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from multimae.checkpoint import find_latest, load_weights
from multimae.core.config import load_config
from data_testutils import lacks_depth, lacks_semseg, partial_folder  # tests/helpers
from multimae.engine.trainer import Trainer
from multimae.tasks.pretrain import PretrainTask
from multimae.tasks.pretrain_config import PretrainConfig
from tiny import TINY_OVERRIDES, tiny_config

N = 12

TINY = [
    *TINY_OVERRIDES, "model.decoder_depth=1", "model.modalities={semseg: {num_classes: 6}}", "mask.num_visible=8",
    "optim.lr=2e-3", "optim.warmup_steps=2", "train.batch_size=4", "train.log_every=1", "train.figure_at_end=false",
    "train.eval_at_end=false", "train.ckpt_every=100", "train.precision=fp32", "train.device=cpu",
    "data.source=folder", "data.missing=allow", "data.cache=false",
]


def _cfg(tmp_path: Path, root: Path, name: str, steps: int, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",
                       TINY + [f"data.root={root}", f"train.out_dir={tmp_path / 'runs'}", f"train.run_name={name}",
                               f"train.max_steps={steps}", *extra])


def test_training_runs_and_logs_the_samples_each_loss_covered(tmp_path, capsys):
    root = partial_folder(tmp_path / "data")
    run = Trainer(PretrainTask(_cfg(tmp_path, root, "allow", 2, "data.num_workers=0", "train.resume=null",
                                    "data.val_fraction=0.34", "train.eval_at_end=true"))).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    out = capsys.readouterr().out  # the run's start says what the data covers
    assert "coverage rgb: 12 of 12 (100.0%), depth: 6 of 12 (50.0%), semseg: 8 of 12 (66.7%)" in out
    for r in rows:
        for task in ("rgb", "depth", "semseg"):
            assert 0 <= r[f"n/{task}"] <= 4 and r[f"loss/{task}"] == r[f"loss/{task}"]  # counted, finite
        assert r["data/skipped"] == 0
    # one epoch (2 batches of 4 of the 8 training samples) covers at most the samples that have each modality
    assert sum(r["n/depth"] for r in rows) <= sum(not lacks_depth(i) for i in range(N))
    assert sum(r["n/semseg"] for r in rows) <= sum(not lacks_semseg(i) for i in range(N))
    assert sum(r["n/depth"] for r in rows) > 0
    # the held-out evaluation scores only the targets present (finite numbers, every task reported)
    ev = json.loads((run / "eval.json").read_text())
    assert {r["task"] for r in ev if r["setting"] == "masked"} == {"rgb", "depth", "semseg"}
    assert all(r["model"] == r["model"] and r["baseline"] == r["baseline"] for r in ev)


def test_depth_loss_equals_the_loss_by_hand_over_present_samples(tmp_path):
    root = partial_folder(tmp_path / "data")
    task = PretrainTask(_cfg(tmp_path, root, "hand", 1, "data.num_workers=0", "train.resume=null"))
    task.build(torch.device("cpu"), None)
    loader, position = task.loader(0, 1)
    position.set_epoch(0)
    model = task.model.eval()
    spec = model.output_specs["depth"]
    p = model.config.patch_size
    checked = mixed = 0
    for batch, plan in loader:
        present = batch.present["depth"]
        mixed += 0 < int(present.sum()) < batch.size
        with torch.no_grad():
            out = model(batch, plan)
        pred, target, hidden = out.preds["depth"], batch["depth"], plan.masks["depth"]
        per_sample = []
        for b in range(batch.size):
            if not bool(present[b]):
                continue
            err = (pred[b] - target[b]).abs()  # l1 per pixel, (1, 32, 32)
            tokens = [float(err[:, r * p:(r + 1) * p, c * p:(c + 1) * p].mean())
                      for r in range(32 // p) for c in range(32 // p)]
            scored = [t for t, h in zip(tokens, hidden[b].tolist()) if h]
            if scored:
                per_sample.append(sum(scored) / len(scored))
        assert spec.loss == "l1" and not spec.norm_pix
        expected = sum(per_sample) / len(per_sample) if per_sample else 0.0
        assert abs(float(out.losses["depth"]) - expected) < 1e-5, (float(out.losses["depth"]), expected)
        assert int(out.counts["depth"]) == len(per_sample)
        # what an absent sample holds in its place never matters
        noisy = batch.rows(slice(None))
        noisy.tensors["depth"] = torch.where(present[:, None, None, None], target, torch.randn_like(target))
        with torch.no_grad():
            again = model(noisy, plan)
        assert torch.equal(again.losses["depth"], out.losses["depth"])
        checked += int(present.any())
    assert checked >= 2 and mixed >= 1


def test_resume_is_bitwise(tmp_path):
    root = partial_folder(tmp_path / "data")
    extra = ("data.num_workers=0", "train.log_every=100", "train.epochs=2")
    Trainer(PretrainTask(_cfg(tmp_path, root, "full", 5, *extra))).fit()
    Trainer(PretrainTask(_cfg(tmp_path, root, "cut", 4, *extra))).fit()  # stops at batch 1 of epoch 1
    resumed = Trainer(PretrainTask(_cfg(tmp_path, root, "cut", 5, *extra)))
    assert resumed.step == 4
    resumed.fit()
    wa = load_weights(find_latest(tmp_path / "runs" / "full"))
    wb = load_weights(find_latest(tmp_path / "runs" / "cut"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_steps_with_absent_modalities_read_nothing():
    """No host synchronisation in a step whose batch lacks modalities in some samples (pretraining:
    depth / semseg absent; fine-tuning: a depth input absent), and n/<task> is read with the
    other stats at a log step."""
    from step_setups import pretrain_micros  # tests/helpers is on sys.path (tests/conftest.py)

    from multimae.core.batch import Batch
    from multimae.engine.host_sync import HostSyncCounter
    from multimae.engine.step import read_stats, train_step
    from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig
    from multimae.tasks.finetune import FinetuneObjective

    model, micros = pretrain_micros("configs/pretrain/synthetic-tiny.yaml")
    for batch, plan in micros:
        for key, absent in (("depth", [0, 2]), ("semseg", [1])):
            batch.present[key] = torch.ones(batch.size, dtype=torch.bool)
            batch.present[key][absent] = False
            plan.masks[key][absent] = True
        plan.uneven = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with HostSyncCounter() as c:
        for m in micros:
            stats = train_step(model, [m], opt)
    assert c.total == 0, dict(c.calls)
    values = read_stats(stats)
    assert values["n/depth"] <= 2 and values["n/semseg"] <= 3 and values["n/rgb"] <= 4

    enc = tiny_config(depth=1)
    net = TransferModel(TransferModelConfig(encoder=enc, inputs=["rgb", "depth"],
                                            head=HeadConfig(kind="classification", num_classes=3), drop_path=0))
    objective = FinetuneObjective(net, lambda pred, b: torch.nn.functional.cross_entropy(pred, b["target"]),
                                  "classification")
    g = torch.Generator().manual_seed(0)
    fmicros = [(Batch({"rgb": torch.randn(4, 3, 32, 32, generator=g), "depth": torch.randn(4, 1, 32, 32, generator=g),
                       "target": torch.randint(0, 3, (4,), generator=g)},
                      present={"depth": torch.tensor([True, False, True, False])}), None) for _ in range(2)]
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    with HostSyncCounter() as c:
        for m in fmicros:
            train_step(objective, [m], opt)
    assert c.total == 0, dict(c.calls)
