"""The fine-tuning engine end to end on tiny synthetic runs: init from a pretraining run, gradients,
layer decay, learning per task, multi-modal and fresh inputs, exact resume, evaluate, linear probe."""
import json

import pytest
import torch

from multimae.checkpoint import find_latest, load_weights, save_checkpoint
from multimae.core.config import load_config, to_dict
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.engine.trainer import Trainer
from multimae.tasks.finetune import FinetuneObjective, FinetuneTask, build_loss, build_mixup
from multimae.tasks.finetune_config import FinetuneConfig
from multimae.tasks.evaluate import evaluate_run
from multimae.engine.step import read_stats, train_step
from tiny import TINY, tiny_encoder_override

ENC = dict(TINY, dim=48, modalities={"semseg": {"num_classes": 6}})
TINY = [
    tiny_encoder_override(**ENC),
    "data.image_size=32", "data.train_samples=32", "data.val_samples=16", "data.test_samples=16",
    "data.num_workers=0", "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=1", "train.log_every=2",
    "model.head.embed_dim=64", "model.head.feature_dim=8", "model.head.layer_dims=[8,8,16,16]",
]


def cfg_for(tmp_path, task="cls", *extra):
    ov = [o for o in TINY if task in ("semseg",) or "embed_dim" not in o]
    ov = [o for o in ov if task in ("depth", "normals") or ("feature_dim" not in o and "layer_dims" not in o)]
    return load_config(FinetuneConfig, f"configs/finetune/synthetic-{task}.yaml", ov + [f"train.out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A pretraining checkpoint of this library (rgb + semseg in, perturbed weights)."""
    d = tmp_path_factory.mktemp("pre")
    cfg = ModelConfig(**ENC, inputs=["rgb", "semseg"], outputs=["rgb"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    mae = MultiMAE(cfg)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(d / "run", 5, mae.state_dict(), {"step": 5}, {"config": {"model": to_dict(cfg)}, "epoch": 1})
    return d / "run", mae.state_dict()


def test_init_from_pretraining_run_gradients_and_layer_decay(tmp_path, pretrain_run):
    run, sd = pretrain_run
    tr = Trainer(FinetuneTask(cfg_for(tmp_path, "semseg", f"init={run}", "optim.layer_decay=0.75")))
    own = tr.model.state_dict()
    for i in range(2):  # every encoder tensor is the checkpoint's, exactly
        for k in [k for k in sd if k.startswith(f"encoder.{i}.")]:
            assert torch.equal(own[k], sd[k]), k
    for k in [k for k in sd if k.startswith("input_adapters.rgb.")]:
        assert torch.equal(own[k], sd[k]), k
    assert torch.equal(own["global_tokens"], sd["global_tokens"])
    assert tr.task.report.new_inputs == [] and any(k.startswith("head.") for k in tr.task.report.missing)

    # layer decay: lr(first block) / lr(last block) = 0.75 ** (depth - 1); head at the peak lr
    def lr_of(name):
        return next(g["lr"] for g in tr.optimizer.param_groups if name in g["param_names"])
    for _ in range(2):
        first, last = lr_of("encoder.0.attn.qkv.weight"), lr_of("encoder.1.attn.qkv.weight")
        assert first / last == pytest.approx(0.75)
        assert lr_of("head.classifier.weight") / last == pytest.approx(1 / 0.75)
        tr.scheduler.step()

    # one step: the head and the encoder (blocks and input projection) all get gradients
    micro = next(tr.batches())
    stats = read_stats(train_step(tr.net, micro, tr.optimizer, scheduler=tr.scheduler))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    for prefix in ("head.", "encoder.0.", "input_adapters.rgb."):
        grads = [p.grad for n, p in tr.model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads), prefix


def test_never_pretrained_modality_and_multimodal_input(tmp_path, pretrain_run):
    """rgb + depth on an encoder pretrained without depth: depth gets a fresh projection that trains."""
    run, sd = pretrain_run
    tr = Trainer(FinetuneTask(cfg_for(tmp_path, "depth", f"init={run}", "model.inputs=[rgb,depth]", "train.max_steps=2")))
    assert tr.task.report.new_inputs == ["depth"]
    assert torch.equal(tr.model.state_dict()["encoder.1.mlp.fc1.weight"], sd["encoder.1.mlp.fc1.weight"])
    before = tr.model.input_adapters["depth"].proj.weight.detach().clone()
    tr.fit()
    assert not torch.equal(before, tr.model.input_adapters["depth"].proj.weight)
    rows = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# task -> (extra overrides, metric, higher is better). Classification reads rgb + semseg (also the
# multi-modal case): the dominant object type from rgb alone needs more steps than a unit test has.
LEARN = {
    "cls": (["model.inputs=[rgb,semseg]", "aug.randaugment=false", "optim.layer_decay=null",
             "aug.label_smoothing=0", "data.train_samples=128", "train.epochs=6", "optim.lr=3e-3"], "top1", True),
    "semseg": (["data.train_samples=64", "train.epochs=4", "optim.lr=3e-3"], "miou", True),
    "depth": (["data.train_samples=64", "train.epochs=4", "optim.lr=3e-3"], "delta1", True),
    "normals": (["data.train_samples=64", "train.epochs=4", "optim.lr=3e-3"], "angular_mean", False),
}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """task -> its fine-tuned run directory (trained on first use)."""
    runs = {}

    def get(task):
        if task not in runs:
            extra, _, _ = LEARN[task]
            d = tmp_path_factory.mktemp(task)
            runs[task] = Trainer(FinetuneTask(cfg_for(d, task, *extra, "optim.warmup_epochs=0.5",
                                                 "data.crop_scale=[0.6,1.0]"))).fit()
        return runs[task]
    return get


# segmentation runs by default; the other three (about 3x its time together) with `make test-all`
@pytest.mark.parametrize("task", [pytest.param(t, marks=() if t == "semseg" else pytest.mark.slow) for t in LEARN])
def test_each_task_beats_its_trivial_baseline(learned, task):
    run = learned(task)
    res = json.loads((run / "eval.json").read_text())
    _, metric, higher = LEARN[task]
    ours, base = res["metrics"][metric], res["baseline"][metric]
    assert (ours > base) if higher else (ours < base), (task, res["metrics"], res["baseline"])
    assert (run / "eval.md").is_file() and (run / "config.json").is_file()
    assert any((run / "tb").iterdir())


def test_evaluate_reproduces_the_runs_final_metrics(learned):
    run = learned("semseg")
    saved = json.loads((run / "eval.json").read_text())
    res = evaluate_run(run)
    assert res["metrics"] == saved["metrics"] and res["baseline"] == saved["baseline"]
    assert (run / "eval-val.md").is_file()
    test = evaluate_run(run, ["data.eval_split=test"])
    assert test["split"] == "test" and (run / "eval-test.json").is_file()
    with pytest.warns(FutureWarning, match="data.eval_split"):  # the old spelling still works
        assert evaluate_run(run, ["data.split=test"])["metrics"] == test["metrics"]


def test_a_run_saved_with_data_split_is_scored_on_that_split(learned, tmp_path):
    """A fine-tuning run saved before data.eval_split recorded its evaluated split as data.split:
    ``multimae evaluate`` scores that split, without a warning (the user wrote nothing old)."""
    import shutil
    import warnings

    run = shutil.copytree(learned("semseg"), tmp_path / "old")
    meta_file = find_latest(run) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["data"]["split"] = "test"
    del meta["config"]["data"]["eval_split"]
    meta_file.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = evaluate_run(run)
    assert res["split"] == "test" and (run / "eval-test.json").is_file()
    assert res["metrics"] == evaluate_run(learned("semseg"), ["data.eval_split=test"])["metrics"]


def test_resume_is_exact(tmp_path):
    """Interrupted + resumed = uninterrupted, bitwise (CPU fp32), with RandAugment, mixup/cutmix
    (timm, numpy RNG) and drop path (torch RNG) all drawing randomness."""
    extra = ["aug.randaugment=true", "aug.mixup=0.8", "aug.cutmix=1.0", "train.epochs=2", "train.ckpt_every=100",
             "model.drop_path=0.2"]
    full = Trainer(FinetuneTask(cfg_for(tmp_path, "cls", *extra, "train.run_name=a"))).fit(evaluate=False)
    Trainer(FinetuneTask(cfg_for(tmp_path, "cls", *extra, "train.run_name=b", "train.max_steps=3"))).fit()
    resumed = Trainer(FinetuneTask(cfg_for(tmp_path, "cls", *extra, "train.run_name=b")))
    assert resumed.step == 3
    resumed.fit(evaluate=False)
    wa, wb = load_weights(find_latest(full)), load_weights(find_latest(tmp_path / "b"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    fresh = Trainer(FinetuneTask(cfg_for(tmp_path, "cls", *extra, "train.run_name=c", "train.max_steps=0")))
    assert not torch.equal(fresh.model.state_dict()["head.fc.weight"], wa["head.fc.weight"])


def test_linear_probe_runs_fast_and_evaluates(tmp_path, pretrain_run):
    from multimae.tasks.probe import run_probe

    run, _ = pretrain_run
    cfg = cfg_for(tmp_path, "probe", f"init={run}", "data.train_samples=64", "probe.epochs=20")
    run_dir, res = run_probe(cfg)
    assert 0 <= res["metrics"]["top1"] <= 100 and "top1" in res["baseline"]
    assert evaluate_run(run_dir)["metrics"] == res["metrics"]
    # the encoder stayed frozen: its weights are the pretraining run's
    w = load_weights(find_latest(run_dir))
    assert torch.equal(w["encoder.0.attn.qkv.weight"], pretrain_run[1]["encoder.0.attn.qkv.weight"])
    # the run directory holds this probe: another one is refused in one line, before anything is written
    from multimae.engine.identity import RunMismatchError

    with pytest.raises(RunMismatchError, match=r"probe\.lr: .* -> 0\.5\. .*train\.resume=force"):
        run_probe(cfg_for(tmp_path, "probe", f"init={run}", "data.train_samples=64", "probe.epochs=20", "probe.lr=0.5"))


def test_loss_and_mixup_choices(tmp_path):
    cfg = cfg_for(tmp_path, "cls", "aug.mixup=0.8", "model.inputs=[rgb,semseg]")
    from multimae.tasks.transfer import prepare

    model, _, cfg = prepare(cfg)
    with pytest.raises(ValueError, match="categorical"):
        FinetuneObjective(model, build_loss(cfg), "label", build_mixup(cfg))
    # classification: hard labels use label smoothing; soft (mixed) targets the soft CE
    loss = build_loss(cfg)
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    hard = loss(logits, {"target": torch.tensor([0])})
    soft = loss(logits, {"target": torch.tensor([[1.0, 0.0, 0.0, 0.0]])})
    assert hard > soft  # smoothing 0.1 penalises the confident right answer
