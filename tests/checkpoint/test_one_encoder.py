"""One encoder under MultiMAE and the transfer model (same key names), the attention kernel set at
construction, version-1 fine-tuning checkpoints upgraded on load, one load entry in eval mode."""
import json

import pytest
import torch
from safetensors.torch import save_file

from multimae.checkpoint import load_weights, save_checkpoint
from multimae.checkpoint.io import META_FILE, WEIGHTS_FILE, upgrade_weights
from multimae.core.config import to_dict
from multimae.model.layers.attention import Attention, CrossAttention
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.model.transfer import HeadConfig, TransferModel, TransferModelConfig, build_transfer_model
from tiny import TINY

ENC = dict(TINY, patch_size=16)


def _ft_cfg(**kw) -> TransferModelConfig:
    return TransferModelConfig(encoder=ModelConfig(**ENC), inputs=["rgb", "depth"],
                               head=HeadConfig(kind="classification", num_classes=3), drop_path=0.0, **kw)


def _v1_names(sd: dict) -> dict:
    """A state dict as version 1 of the checkpoint format saved a transfer model."""
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            k = "encoder.blocks." + k[len("encoder."):]
        elif k.startswith("encoder_norm."):
            k = "encoder.norm." + k[len("encoder_norm."):]
        elif k.startswith(("input_adapters.", "global_tokens")):
            k = "encoder." + k
        out[k] = v
    return out


def test_transfer_model_encoder_keys_are_multimae_keys():
    mae = MultiMAE(ModelConfig(**ENC, inputs=["rgb", "depth"], outputs=[]))
    ft = TransferModel(_ft_cfg())
    enc = {k for k in ft.state_dict() if not k.startswith("head.")}
    assert enc == set(mae.state_dict())
    assert {k.split(".")[0] for k in ft.state_dict()} == {"input_adapters", "global_tokens", "encoder", "head"}


def test_attention_kernel_is_a_constructor_argument():
    ft = TransferModel(_ft_cfg(attention="manual"))  # the transfer config's kernel, not the encoder's "auto"
    assert {m.mode for m in ft.modules() if isinstance(m, Attention)} == {"manual"}
    assert ft.encoder_config.attention == "manual"
    mae = MultiMAE(ModelConfig(**ENC, inputs=["rgb", "depth"], outputs=["rgb", "depth"], attention="fused",
                               decoder_heads=2, decoder_dim=16))
    modes = {m.mode for m in mae.modules() if isinstance(m, (Attention, CrossAttention))}
    assert modes == {"fused"} and sum(isinstance(m, CrossAttention) for m in mae.modules()) == 2


def test_version_1_finetune_checkpoint_is_upgraded_on_load(tmp_path):
    torch.manual_seed(0)
    model = TransferModel(_ft_cfg()).eval()
    old = _v1_names(model.state_dict())
    assert "encoder.blocks.1.mlp.fc1.weight" in old and "encoder.input_adapters.rgb.proj.weight" in old
    ckpt = save_checkpoint(tmp_path / "ft", 3, old, {}, {"config": {"model": to_dict(model.config)}, "epoch": 0})
    meta = json.loads((ckpt / META_FILE).read_text())
    (ckpt / META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    assert load_weights(ckpt).keys() == model.state_dict().keys()
    again, report = build_transfer_model(model.config, tmp_path / "ft")
    assert report.missing == [] and report.loaded == sorted(model.state_dict())  # the head too
    b = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        assert torch.equal(again.eval()(b), model(b))
    # a bare weights file has no version: version 1 names are recognised as such
    save_file(old, str(tmp_path / "old.safetensors"))
    assert load_weights(tmp_path / "old.safetensors").keys() == model.state_dict().keys()
    again, report = build_transfer_model(model.config, tmp_path / "old.safetensors")
    assert report.missing == []
    # weights of the current version, and pretraining weights of any, keep their names
    assert upgrade_weights(model.state_dict(), 1).keys() == model.state_dict().keys()
    assert list(upgrade_weights(old, 2)) == list(old)
    assert (ckpt / WEIGHTS_FILE).is_file()


def test_from_pretrained_is_the_one_entry_and_returns_eval_mode(tmp_path):
    mae = MultiMAE(ModelConfig(**ENC, inputs=["rgb"], outputs=["rgb"], decoder_heads=2, decoder_dim=16))
    sd = mae.state_dict()  # a bare state dict in official names: architecture read off the shapes
    loaded = MultiMAE.from_pretrained(sd, num_heads=2, decoder_heads=2)
    assert not loaded.training
    model, report = MultiMAE.from_pretrained(sd, with_report=True, num_heads=2, decoder_heads=2)
    assert not model.training and report.kind == "official-multimae" and report.loaded == sorted(sd)


def test_finetune_weights_into_multimae_point_to_the_transfer_loader(tmp_path):
    from multimae.checkpoint.convert import ConversionError

    model = TransferModel(_ft_cfg())
    save_checkpoint(tmp_path / "ft", 1, model.state_dict(), {}, {"config": {"model": to_dict(model.config)}, "epoch": 0})
    with pytest.raises(ConversionError, match="head.fc.weight.*build_transfer_model"):
        MultiMAE.from_pretrained(tmp_path / "ft")
