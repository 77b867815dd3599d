"""multimae.runs.load_run: one loader for pretraining, fine-tuning and probe runs; the probe is a
head loaded with the rest in one strict load; a wrong or damaged run is one clear error."""
from __future__ import annotations

import pytest
import torch

from multimae.checkpoint import CheckpointError, save_checkpoint
from multimae.core.config import to_dict
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig
from multimae.runs import ProbeModel, load_run
from tiny import TINY

ENC = dict(TINY, depth=1, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _transfer_cfg(kind: str = "segmentation", K: int = 3) -> TransferModelConfig:
    return TransferModelConfig(encoder=ModelConfig(**ENC, inputs=["rgb"], outputs=["rgb"]), inputs=["rgb"],
                               head=HeadConfig(kind=kind, num_classes=K), drop_path=0.0)


def _save(run_dir, model, kind: str | None, config: dict) -> None:
    meta = {"config": config, **({"kind": kind} if kind else {})}
    save_checkpoint(run_dir, 7, model.state_dict(), {"step": 7}, meta)


def test_finetune_run(tmp_path):
    cfg = _transfer_cfg()
    model = TransferModel(cfg)
    _save(tmp_path / "ft", model, "finetune", {"model": to_dict(cfg), "data": {"image_size": 32, "source": "synthetic"}})
    run = load_run(tmp_path / "ft")
    assert run.kind == "finetune" and run.step == 7 and not run.model.training
    assert [s.name for s in run.inputs] == ["rgb"] and run.image_size == 32
    (task, out), = run.outputs.items()
    assert (task, out.kind, out.num_classes) == ("semseg", "segmentation", 3)
    x = {"rgb": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), model.eval()(x))


def test_probe_run_is_a_head_loaded_in_one_go(tmp_path):
    cfg = _transfer_cfg("classification", 4)
    probe = ProbeModel(cfg)
    with torch.no_grad():
        probe.probe.fc.weight.normal_()
    _save(tmp_path / "pr", probe, "probe", {"model": to_dict(cfg), "data": {"classes": ["a", "b", "c", "d"]}})
    run = load_run(tmp_path / "pr")
    assert run.kind == "probe" and isinstance(run.model, ProbeModel)
    assert run.outputs["label"].classes == ["a", "b", "c", "d"]
    torch.testing.assert_close(run.model.probe.fc.weight, probe.probe.fc.weight)
    x = {"rgb": torch.randn(3, 3, 32, 32)}
    with torch.no_grad():
        assert run.model(x).shape == (3, 4)
        torch.testing.assert_close(run.model(x), probe.eval()(x))


def test_probe_run_without_its_probe_weights_is_refused(tmp_path):
    cfg = _transfer_cfg("classification", 4)
    _save(tmp_path / "pr", TransferModel(cfg), "probe", {"model": to_dict(cfg)})  # no probe.* tensors
    with pytest.raises(Exception, match="probe"):
        load_run(tmp_path / "pr")


def test_pretraining_run_and_its_outputs(tmp_path):
    mcfg = ModelConfig(**{**ENC, "inputs": ["rgb"], "outputs": ["rgb", "semseg", "depth"]})
    model = MultiMAE(mcfg)
    _save(tmp_path / "pre", model, None, {"model": to_dict(mcfg), "data": {"source": "synthetic"}})
    run = load_run(tmp_path / "pre", overrides=["train.seed=3"])
    assert run.kind == "pretrain" and run.config["train"]["seed"] == 3
    assert {t: o.kind for t, o in run.outputs.items()} == {"rgb": "dense", "semseg": "segmentation", "depth": "dense"}
    # the synthetic scenes name fewer classes than this model's 133: no names rather than wrong ones
    assert run.outputs["semseg"].num_classes == 133 and run.outputs["semseg"].classes is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[k], v)


def test_missing_and_unknown_runs_are_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nope")
    cfg = _transfer_cfg()
    _save(tmp_path / "odd", TransferModel(cfg), "distill", {"model": to_dict(cfg)})
    with pytest.raises(CheckpointError, match="unknown run kind 'distill'"):
        load_run(tmp_path / "odd")


def test_pretraining_run_with_missing_weights_is_refused(tmp_path):
    mcfg = ModelConfig(**{**ENC, "inputs": ["rgb"], "outputs": ["rgb", "depth"]})
    sd = {k: v for k, v in MultiMAE(mcfg).state_dict().items() if not k.startswith("output_adapters.depth")}
    save_checkpoint(tmp_path / "pre", 1, sd, {"step": 1}, {"config": {"model": to_dict(mcfg)}})
    with pytest.raises(Exception, match="depth"):
        load_run(tmp_path / "pre")
