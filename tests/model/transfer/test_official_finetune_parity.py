"""The official fine-tuning architecture (MultiViT + ConvNeXt / DPT / linear heads) loads through
the one filter and is reproduced to 1e-5 relative (golden made by the official code)."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from multimae.checkpoint.convert import ConversionError
from multimae.model.multimae import ModelConfig
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig, build_transfer_model

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "multimae-official-finetune-compact.safetensors"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def meta():
    with safe_open(str(GOLDEN), "pt") as f:
        return f.metadata()


def _state(golden):
    return {k.removeprefix("state."): v for k, v in golden.items() if k.startswith("state.")}


def _cfg(meta, head: HeadConfig) -> TransferModelConfig:
    enc = ModelConfig(preset="nano", dim=int(meta["dim"]), depth=int(meta["depth"]), num_heads=int(meta["heads"]),
                      patch_size=int(meta["patch"]), image_size=int(meta["img"]))
    return TransferModelConfig(encoder=enc, inputs=["rgb", "depth"], head=head, drop_path=0.0)


def _heads(meta):
    dims = [int(x) for x in meta["dpt_dims"].split(",")]
    return {
        "semseg": (HeadConfig(kind="segmentation", num_classes=int(meta["classes"]),
                              embed_dim=int(meta["convnext_dim"]), num_blocks=int(meta["convnext_depth"])), "out.semseg"),
        "depth": (HeadConfig(kind="depth", out_channels=1, hooks=[0, 1, 2, 3], layer_dims=dims,
                             feature_dim=int(meta["dpt_feature"])), "out.depth"),
        "cls": (HeadConfig(kind="classification", num_classes=int(meta["cls_classes"])), "out.cls"),
    }


def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("task", ["semseg", "depth", "cls"])
def test_official_heads_reproduced(golden, meta, task):
    head, key = _heads(meta)[task]
    model, report = build_transfer_model(_cfg(meta, head), _state(golden))
    model.eval()
    batch = {"rgb": golden["input.rgb"], "depth": golden["input.depth"]}
    with torch.no_grad():
        _close(model.encode_all(batch).last, golden["encoder.last"])
        _close(model(batch), golden[key])
    # exact key report: everything of the model came from the checkpoint; the other two heads
    # are dropped, nothing else
    assert report.missing == [] and report.new_inputs == []
    assert sorted(report.loaded) == sorted(model.state_dict())
    others = {k for k in _state(golden) if k.startswith("output_adapters.") and not k.startswith(f"output_adapters.{task}.")}
    if task == "depth":  # the deepest fusion block's residual unit is never used (no skip input)
        others |= {f"output_adapters.depth.scratch.refinenet4.resConfUnit1.{c}.{w}"
                   for c in ("conv1", "conv2") for w in ("weight", "bias")}
    assert set(report.dropped) == others
    if task == "depth":  # the official DPT registers 6 modules twice: loaded once, listed as aliases
        assert len(report.aliases) == 7 * 2 + 4
        assert all("act_postprocess." in k or "layer_rn." in k for k in report.aliases)
    else:
        assert report.aliases == []


def test_official_pth_file_and_inferred_encoder(golden, meta, tmp_path):
    """An official fine-tuned .pth (``model`` entry) loads from disk; with no encoder config the
    architecture is read off the tensors."""
    p = tmp_path / "official_finetuned.pth"
    torch.save({"model": _state(golden), "epoch": 3}, p)
    head, key = _heads(meta)["cls"]
    model, report = build_transfer_model(_cfg(meta, head), p)
    with torch.no_grad():
        _close(model.eval()({"rgb": golden["input.rgb"], "depth": golden["input.depth"]}), golden[key])
    assert report.source == str(p)
    inferred, _ = build_transfer_model(TransferModelConfig(encoder=None, inputs=["rgb"], head=head), p,
                                       num_heads=int(meta["heads"]))  # not in the weights; width 64 is no ViT's
    assert (inferred.dim, inferred.depth, inferred.patch_size) == (64, 4, 16)


def test_disagreeing_duplicate_names_are_an_error(golden, meta):
    sd = _state(golden)
    sd["output_adapters.depth.act_postprocess.0.0.bias"] = sd["output_adapters.depth.act_postprocess.0.0.bias"] + 1
    head, _ = _heads(meta)["depth"]
    with pytest.raises(ConversionError, match="act_1_postprocess.0.bias and .*act_postprocess.0.0.bias"):
        build_transfer_model(_cfg(meta, head), sd)


def test_missing_encoder_key_and_shape_mismatch_are_named(golden, meta):
    head, _ = _heads(meta)["cls"]
    sd = _state(golden)
    del sd["encoder.2.mlp.fc1.weight"]
    sd["output_adapters.cls.head.weight"] = torch.zeros(9, 64)
    with pytest.raises(ConversionError) as e:
        build_transfer_model(_cfg(meta, head), sd)
    msg = str(e.value)
    assert "encoder.2.mlp.fc1.weight" in msg
    assert ("head.fc.weight: checkpoint (9, 64) vs model (5, 64) (checkpoint key output_adapters.cls.head.weight)"
            in msg)


def test_head_of_other_kind_is_fresh_and_reported(golden, meta):
    """A semseg head on a checkpoint that has none of its kind -> encoder loaded, head fresh."""
    sd = {k: v for k, v in _state(golden).items() if not k.startswith("output_adapters.semseg.")}
    head, _ = _heads(meta)["semseg"]
    model, report = build_transfer_model(_cfg(meta, head), sd)
    assert report.missing == sorted(k for k in model.state_dict() if k.startswith("head."))
    assert report.loaded and not any(k.startswith("head.") for k in report.loaded)


def test_official_pretraining_pth_gives_the_encoder(tmp_path):
    """An official MultiMAE pretraining checkpoint: encoder copied exactly, decoders and the
    unused semseg input adapter dropped, architecture read off the tensors."""
    pre = load_file(str(GOLDEN.parent / "multimae-official-compact.safetensors"))
    sd = {k.removeprefix("state."): v for k, v in pre.items() if k.startswith("state.")}
    p = tmp_path / "official_pretrain.pth"
    torch.save({"model": sd, "args": None}, p)
    cfg = TransferModelConfig(encoder=None, inputs=["rgb", "depth"], head=HeadConfig(kind="depth"))
    model, report = build_transfer_model(cfg, p, num_heads=2)  # the golden's 2 heads: not in the weights
    own = model.state_dict()
    assert (model.dim, model.depth) == (48, 2)
    for k, v in sd.items():
        if k.startswith("encoder."):
            assert torch.equal(own[k], v), k
        elif k.startswith(("input_adapters.rgb.", "input_adapters.depth.")) or k == "global_tokens":
            assert torch.equal(own[k], v), k
    assert set(report.dropped) == {k for k in sd if k.startswith(("output_adapters.", "input_adapters.semseg."))}
    assert report.missing == sorted(k for k in own if k.startswith("head."))


def test_other_image_size_fits_position_tables(golden, meta):
    """Fine-tuning at 32 px from a 64 px checkpoint: a sine-cosine table is regenerated for the
    2x2 grid (equal to the model's own), a learned (here: perturbed) one resampled bicubically."""
    from multimae.checkpoint.resize import sincos_table

    head, _ = _heads(meta)["cls"]
    cfg = _cfg(meta, head)
    cfg.encoder.image_size = 32
    sd = _state(golden)
    sd["input_adapters.depth.pos_emb"] = sincos_table(4, 4, 64)
    model, report = build_transfer_model(cfg, sd)
    own = model.state_dict()
    torch.testing.assert_close(own["input_adapters.depth.pos_emb"],
                               TransferModel(cfg).state_dict()["input_adapters.depth.pos_emb"])
    torch.testing.assert_close(own["input_adapters.rgb.pos_emb"],
                               torch.nn.functional.interpolate(sd["input_adapters.rgb.pos_emb"], size=(2, 2),
                                                               mode="bicubic", align_corners=False))
    assert report.resized == {"input_adapters.depth.pos_emb": "4x4 -> 2x2 regenerated (rows_first sine-cosine)",
                              "input_adapters.rgb.pos_emb": "4x4 -> 2x2 resampled (bicubic)"}
    assert "input_adapters.rgb.pos_emb" in report.loaded
