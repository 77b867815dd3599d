"""No host synchronisation in a training step: N steps of pretraining (MultiMAE, M3AE with padded
text and absent samples) and of fine-tuning (classification, segmentation, depth) make no call
that reads a device value (``HostSyncCounter``: bool / int / float / item / tolist / nonzero /
boolean-mask indexing) outside log steps."""
import pytest
import torch

from multimae.core.config import load_config
from multimae.engine import trainer as trainer_mod
from multimae.engine.host_sync import HostSyncCounter
from multimae.engine.step import read_stats, train_step
from multimae.tasks.pretrain import PretrainTask
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.model.transfer import HeadConfig
from step_setups import NANO, finetune_micros, pretrain_micros  # tests/helpers is on sys.path (tests/conftest.py)


def _count(model, micros):
    """Syncs during ``train_step`` over ``micros`` (no log step among them), then the log step's."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with HostSyncCounter() as c:
        for m in micros:
            stats = train_step(model, [m], opt, clip_grad=1.0)
    with HostSyncCounter() as at_log:
        values = read_stats(stats)
    assert at_log.calls == {"tolist": 1}  # a log step reads every stat in one copy
    assert values["finite"] == 1.0 and torch.isfinite(torch.tensor(values["loss"]))
    return c


def test_counter_counts_every_kind_of_read():
    t = torch.tensor([1.0, 0.0, 2.0])
    with HostSyncCounter() as c:
        bool(t.any()), int(t.sum()), float(t[0]), t.max().item(), t.tolist(), t.nonzero(), t[t > 0]
        torch.nonzero(t)
        t[t > 1] = 0.0
        torch.where(t > 0, t, 0.0).sum() / 3  # none: stays on the device
    assert c.calls == {"__bool__": 1, "__int__": 1, "__float__": 1, "item": 1, "tolist": 1, "nonzero": 2,
                       "getitem[bool]": 1, "setitem[bool]": 1}
    assert c.total == 9


def test_multimae_pretraining_steps_read_nothing():
    model, micros = pretrain_micros("configs/pretrain/synthetic-tiny.yaml")
    assert all(p.num_visible == 12 and not p.uneven for _, p in micros)  # the plan carries the budget
    c = _count(model, micros)
    assert c.total == 0, dict(c.calls)


@pytest.mark.parametrize("decoder", ["shared", "per_task"])
def test_m3ae_steps_with_padding_and_absent_samples_read_nothing(decoder):
    model, micros = pretrain_micros("configs/pretrain/synthetic-m3ae-tiny.yaml", "model.modalities.caption.max_len=12",
                                     "model.decoder_dim=32", f"model.decoder={decoder}")
    batch, plan = micros[0]
    # make the text uneven: padding in one sample, no caption at all in another (unpaired data)
    batch.pad["caption"][0, 5:] = True
    batch.present["caption"][1] = False
    plan.masks["caption"][0, 5:] = True
    plan.masks["caption"][1] = True
    plan.uneven = True
    c = _count(model, micros)
    assert c.total == 0, dict(c.calls)


def test_a_plan_without_budget_is_counted_once_per_forward():
    """Hand-made plans (no num_visible) still work: the model counts them, one read per forward."""
    model, micros = pretrain_micros("configs/pretrain/synthetic-tiny.yaml")
    batch, plan = micros[0]
    bare = type(plan)(dict(plan.masks))
    with torch.no_grad():
        want = model(batch, plan).loss
        with HostSyncCounter() as c:
            got = model(batch, bare).loss
    assert torch.equal(got, want)
    assert 0 < c.total <= 2, dict(c.calls)


@pytest.mark.parametrize("head,config", [
    (HeadConfig(kind="classification", num_classes=4), "configs/finetune/synthetic-cls.yaml"),
    (HeadConfig(kind="segmentation", num_classes=6, embed_dim=64), "configs/finetune/synthetic-semseg.yaml"),
    (HeadConfig(kind="depth", feature_dim=16), "configs/finetune/synthetic-depth.yaml"),
])
def test_finetuning_steps_read_nothing(head, config):
    objective, micros = finetune_micros(head.kind, head, config)
    c = _count(objective, micros)
    assert c.total == 0, dict(c.calls)


def test_trainer_reads_device_values_only_at_log_steps(tmp_path, monkeypatch):
    """The whole loop: every step of ``Trainer.fit`` (train_step and the non-finite watch) reads
    nothing; the stats are read once per ``train.log_every`` (and at the last step)."""
    per_step, reads = [], []
    real_step, real_track, real_read = trainer_mod.train_step, trainer_mod.NonFiniteWatch.track, trainer_mod.read_stats

    def step(*args, **kwargs):
        with HostSyncCounter() as c:
            out = real_step(*args, **kwargs)
        per_step.append(c.total)
        return out

    def track(self, *args):
        with HostSyncCounter() as c:
            real_track(self, *args)
        per_step[-1] += c.total

    def read(stats):
        reads.append(len(per_step))
        return real_read(stats)

    monkeypatch.setattr(trainer_mod, "train_step", step)
    monkeypatch.setattr(trainer_mod.NonFiniteWatch, "track", track)
    monkeypatch.setattr(trainer_mod, "read_stats", read)
    cfg = load_config(PretrainConfig, "configs/pretrain/synthetic-tiny.yaml",
                      NANO + [f"train.out_dir={tmp_path}", "train.max_steps=5", "train.log_every=2",
                              "train.ckpt_every=100", "train.figure_at_end=false", "train.vis_every=0"])
    trainer_mod.Trainer(PretrainTask(cfg)).fit(evaluate=False)
    assert per_step == [0] * 5
    assert reads == [2, 4, 5]
