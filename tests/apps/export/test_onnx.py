"""ONNX export (`multimae export --onnx`): every head kind of a fine-tuning run, a probe run and
encoders, run by onnxruntime at other batch sizes than traced and compared with PyTorch."""
import json

import numpy as np
import onnx
import pytest
import torch

from multimae.checkpoint import save_checkpoint
from multimae.cli.main import main
from multimae.core.config import load_config, to_dict
from multimae.apps.export import export_onnx, load_exportable, run_onnx
from multimae.model.multimae import MultiMAE
from multimae.engine.trainer import Trainer
from multimae.tasks.finetune import FinetuneTask
from multimae.tasks.finetune_config import FinetuneConfig
from tiny import tiny_config, tiny_encoder_override

ENC = tiny_encoder_override(dim=48, modalities={"semseg": {"num_classes": 6}})
TINY = [ENC, "data.image_size=32", "data.train_samples=8", "data.val_samples=4", "data.num_workers=0",
        "train.batch_size=4", "train.eval_batch_size=4", "train.max_steps=1", "train.log_every=1",
        "model.head.embed_dim=64", "model.head.feature_dim=8", "model.head.layer_dims=[8,8,16,16]"]


def _run(tmp_path, task, *extra):
    ov = [o for o in TINY if task == "semseg" or "embed_dim" not in o]
    ov = [o for o in ov if task in ("depth", "normals") or ("feature_dim" not in o and "layer_dims" not in o)]
    cfg = load_config(FinetuneConfig, f"configs/finetune/synthetic-{task}.yaml",
                      ov + [f"train.out_dir={tmp_path}", "train.run_name=r", *extra])
    return Trainer(FinetuneTask(cfg)).fit(evaluate=False)


def _check(run, out, batch=5, **kw):
    info = export_onnx(run, out, **kw)
    model, desc = load_exportable(run, encoder_only=kw.get("encoder_only", False))
    assert info.max_abs_diff is not None and info.max_abs_diff < 1e-4 and info.checked_batch == 3
    onnx.checker.check_model(onnx.load(str(out)))
    # another batch size than traced (2) or checked (3), real-looking inputs
    g = torch.Generator().manual_seed(7)
    feeds = {sp.key: torch.randn(batch, sp.channels, 32, 32, generator=g) for sp in desc["specs"]}
    got = run_onnx(out, feeds)
    with torch.no_grad():
        want = model(feeds) if desc["kind"] != "encoder" else model(feeds).last
    assert got.shape == tuple(want.shape) and got.shape[0] == batch
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    return info, got


@pytest.mark.parametrize("task,extra,shape", [
    ("cls", ("model.inputs=[rgb,depth]",), (5, 4)),
    ("semseg", (), (5, 6, 32, 32)),
    ("depth", ("model.inputs=[rgb,depth]",), (5, 1, 32, 32)),
])
def test_finetuned_heads_export_and_match(tmp_path, task, extra, shape):
    run = _run(tmp_path, task, *extra)
    info, got = _check(run, tmp_path / "m.onnx")
    assert got.shape == shape
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["multimae.image_size"] == "32" and json.loads(meta["multimae.inputs"])[0] == "rgb"
    assert json.loads(meta["multimae.input_mean"])["rgb"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["multimae.kind"] == {"cls": "classification", "semseg": "segmentation", "depth": "depth"}[task]
    if task == "depth":  # the output may not take the depth input's name
        assert meta["multimae.output"] == "depth_pred" and json.loads(meta["multimae.inputs"]) == ["rgb", "depth"]
    if task == "cls":
        assert json.loads(meta["multimae.inputs"]) == ["rgb", "depth"]
        assert len(json.loads(meta["multimae.classes"])) == 4
        # the encoder alone of the same run: every token of both inputs + the global token
        info, got = _check(run, tmp_path / "enc.onnx", encoder_only=True)
        assert info.kind == "encoder" and got.shape == (5, 2 * 16 + 1, 48)


def test_pretraining_run_encoder_and_cli(tmp_path, capsys):
    cfg = tiny_config(dim=48, inputs=["rgb", "depth"], outputs=["rgb"], decoder_dim=16, decoder_depth=1,
                      decoder_heads=2)
    mae = MultiMAE(cfg)
    save_checkpoint(tmp_path / "pre", 3, mae.state_dict(), {"step": 3}, {"config": {"model": to_dict(cfg)}, "epoch": 1})
    assert main(["export", "--onnx", str(tmp_path / "e.onnx"), "--checkpoint", str(tmp_path / "pre")]) == 0
    line = capsys.readouterr().out
    assert "encoder" in line and "max |diff|" in line and "rgb (batch, 3, 32, 32)" in line
    feeds = {"rgb": torch.randn(4, 3, 32, 32), "depth": torch.randn(4, 1, 32, 32)}
    with torch.no_grad():
        enc = mae.encode(feeds)  # the pretraining model's own encoder pass over every token
    got = run_onnx(tmp_path / "e.onnx", feeds)
    np.testing.assert_allclose(got, enc.tokens.numpy(), atol=1e-4, rtol=0)


def test_probe_run_exports_the_probe(tmp_path):
    from multimae.tasks.probe import run_probe

    cfg = tiny_config(dim=48, inputs=["rgb"], outputs=["rgb"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    save_checkpoint(tmp_path / "pre", 3, MultiMAE(cfg).state_dict(), {"step": 3},
                    {"config": {"model": to_dict(cfg)}, "epoch": 1})
    pc = load_config(FinetuneConfig, "configs/finetune/synthetic-probe.yaml",
                     [o for o in TINY if "head." not in o] +
                     [f"init={tmp_path / 'pre'}", f"train.out_dir={tmp_path}", "probe.epochs=2"])
    run_dir, _ = run_probe(pc)
    info, got = _check(run_dir, tmp_path / "p.onnx")
    assert info.kind == "probe" and got.shape == (5, 4)


def test_bad_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["export", "--onnx", str(tmp_path / "x.onnx"), "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_pretraining_run_with_semseg_input_exports_without_inputs(tmp_path, capsys):
    """The docs' own example (no --inputs) on an rgb+depth+semseg run: the image-like inputs by
    default; semseg asked for explicitly is traced with integer class ids."""
    cfg = tiny_config(dim=48, depth=1, modalities={"semseg": {"num_classes": 6}}, inputs=["rgb", "depth", "semseg"],
                      outputs=["rgb"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    mae = MultiMAE(cfg)
    save_checkpoint(tmp_path / "pre", 3, mae.state_dict(), {"step": 3}, {"config": {"model": to_dict(cfg)}, "epoch": 1})
    assert main(["export", "--onnx", str(tmp_path / "e.onnx"), "--checkpoint", str(tmp_path / "pre")]) == 0
    line = capsys.readouterr().out
    assert "rgb (batch, 3, 32, 32), depth (batch, 1, 32, 32) ->" in line and "semseg" not in line
    assert main(["export", "--onnx", str(tmp_path / "s.onnx"), "--checkpoint", str(tmp_path / "pre"),
                 "--inputs", "rgb,semseg"]) == 0
    assert "semseg (batch, 8, 8)" in capsys.readouterr().out
    feeds = {"rgb": torch.randn(2, 3, 32, 32), "semseg": torch.randint(0, 6, (2, 8, 8))}
    with torch.no_grad():
        want = mae.encode(feeds).tokens
    np.testing.assert_allclose(run_onnx(tmp_path / "s.onnx", feeds), want.numpy(), atol=1e-4, rtol=0)
