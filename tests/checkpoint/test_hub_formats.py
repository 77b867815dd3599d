"""transformers ViTMAE / ViT directories in (from_pretrained, train.init, convert, transfer init) and
out (a ViTMAEModel directory), with tokens equal to transformers' own; head counts never guessed."""
import pytest
import torch
import transformers
from transformers import (ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel,
                          ViTModel)

from multimae.checkpoint.convert import ConversionError
from multimae.checkpoint.vit import to_transformers_vitmae
from multimae.cli.main import main
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.model.transfer import HeadConfig, TransferModelConfig, build_transfer_model

# width 96 with 3 heads: no standard ViT's, so the head count must come from config.json
KW = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=256, image_size=32,
          patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
N = (32 // 8) ** 2


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    mae = _perturbed(ViTMAEForPreTraining(ViTMAEConfig(**KW, mask_ratio=0.0, decoder_hidden_size=32,
                                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                                       decoder_intermediate_size=64)))
    mae.save_pretrained(d / "vitmae-pre")
    mae.vit.save_pretrained(d / "vitmae")
    vit = _perturbed(ViTModel(ViTConfig(**KW), add_pooling_layer=True))
    vit.save_pretrained(d / "vit")
    cls = _perturbed(ViTForImageClassification(ViTConfig(**KW, num_labels=5)))
    cls.save_pretrained(d / "vit-cls", safe_serialization=False)  # pytorch_model.bin
    return d, {"vitmae-pre": mae.vit, "vitmae": mae.vit, "vit": vit, "vit-cls": cls.vit}


def _hf_tokens(hf, x):
    with torch.no_grad():
        if isinstance(hf, ViTMAEModel):  # identity noise: no shuffle (mask ratio 0)
            out = hf(pixel_values=x, noise=torch.arange(N, dtype=torch.float).expand(x.shape[0], N))
        else:
            out = hf(pixel_values=x)
    h = out.last_hidden_state
    return torch.cat([h[:, 1:], h[:, :1]], dim=1)  # ours: patches first, the global (class) token last


@pytest.mark.parametrize("name", ["vitmae-pre", "vitmae", "vit", "vit-cls"])
def test_hub_directories_load_with_equal_tokens(hub, name):
    d, models = hub
    x = torch.randn(2, 3, 32, 32)
    ours = MultiMAE.from_pretrained(d / name, outputs=[])
    assert (ours.config.num_heads, ours.config.norm_eps, ours.config.patch_size, ours.config.image_size) == \
        (3, 1e-12, 8, 32)
    with torch.no_grad():
        tokens = ours.encode({"rgb": x}).tokens
    torch.testing.assert_close(tokens, _hf_tokens(models[name], x), rtol=0, atol=1e-5)


def test_unused_parts_are_reported(hub, capsys):
    d, _ = hub
    assert main(["convert", str(d / "vitmae-pre"), str(d / "out-mm")]) == 0
    out = capsys.readouterr().out
    assert "ViTMAE decoder" in out and "transformers-vit_mae" in out
    assert main(["convert", str(d / "vit-cls"), str(d / "out-cls")]) == 0
    out = capsys.readouterr().out
    assert "classification head (unused)" in out and "pooler" not in out.split("dropped")[0]
    assert MultiMAE.from_pretrained(d / "out-mm").config.num_heads == 3


def test_train_init_and_transfer_init_from_a_hub_directory(hub):
    d, models = hub
    from multimae.checkpoint.pretrained import init_from

    run = MultiMAE(ModelConfig(preset="nano", dim=96, depth=2, num_heads=3, patch_size=8, image_size=32,
                               inputs=["rgb", "depth"], outputs=["rgb"], encoder_norm=True, norm_eps=1e-12,
                               mlp_ratio=256 / 96, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    report = init_from(run, d / "vitmae")
    from safetensors.torch import load_file

    saved = load_file(str(d / "vitmae" / "model.safetensors"))  # the names on disk (not transformers' in-memory ones)
    fc2 = next(v for k, v in saved.items() if k.endswith("layer.1.output.dense.weight"))
    assert torch.equal(run.state_dict()["encoder.1.mlp.fc2.weight"], fc2)
    assert any(k.startswith("output_adapters.") for k in report.added)
    model, rep = build_transfer_model(TransferModelConfig(encoder=None, inputs=["rgb"],
                                                          head=HeadConfig(kind="classification", num_classes=2)),
                                      d / "vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_all({"rgb": x}).last, _hf_tokens(models["vit"], x),
                                   rtol=0, atol=1e-5)


def test_export_to_a_transformers_vitmae_directory(tmp_path, capsys):
    torch.manual_seed(1)
    ours = _perturbed(MultiMAE(ModelConfig(preset="nano", dim=96, depth=2, num_heads=3, patch_size=8, image_size=32,
                                           inputs=["rgb"], outputs=[])))
    out, report = to_transformers_vitmae(ours, tmp_path / "hf")
    loaded, info = ViTMAEModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mine = ours.encode({"rgb": x}).tokens
    theirs = _hf_tokens(loaded.eval(), x)
    # identity-affine final layernorm: transformers' output is LayerNorm(our tokens)
    torch.testing.assert_close(theirs, torch.nn.functional.layer_norm(mine, (96,), eps=1e-6), rtol=0, atol=1e-5)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0  # and back in
    capsys.readouterr()
    back = MultiMAE.from_pretrained(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.encode({"rgb": x}).tokens, theirs, rtol=0, atol=1e-5)
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "hf2"), "--to", "transformers"]) == 0
    assert "ViTMAEModel.from_pretrained" in capsys.readouterr().out


def test_head_count_is_never_guessed(tmp_path, capsys):
    """Width 96 stores no head count in a timm / MAE / official checkpoint: refused, naming num_heads=."""
    from multimae.checkpoint.vit import to_timm_state_dict

    mm = MultiMAE(ModelConfig(preset="nano", dim=96, depth=1, num_heads=3, patch_size=8, image_size=32,
                              inputs=["rgb"], outputs=["rgb"], decoder_dim=16, decoder_depth=1, decoder_heads=2))
    timm_sd, _, _ = to_timm_state_dict(mm)
    mae_sd = {k: v for k, v in timm_sd.items() if k != "norm.weight" and k != "norm.bias"}
    for name, sd in (("timm.pth", timm_sd), ("mae.pth", {"model": mae_sd}), ("official.pth", {"model": mm.state_dict()})):
        torch.save(sd, tmp_path / name)
        with pytest.raises(ConversionError, match=r"width 96 .*num_heads="):
            MultiMAE.from_pretrained(tmp_path / name)
        assert MultiMAE.from_pretrained(tmp_path / name, num_heads=3).config.num_heads == 3
        assert main(["convert", str(tmp_path / name), str(tmp_path / f"o-{name}")]) == 2
        assert "num_heads=" in capsys.readouterr().err
