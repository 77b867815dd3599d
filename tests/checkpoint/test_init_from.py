"""train.init: a fresh run starts from MAE / timm / official weights where they fit."""
import pytest
import torch

from multimae import ModelConfig, MultiMAE
from multimae.checkpoint.convert import ConversionError
from multimae.checkpoint.pretrained import init_from
from multimae.core.config import load_config
from multimae.tasks.pretrain_config import PretrainConfig
from weights_testutils import mae_state_dict
from tiny import TINY


def model(**kw):
    torch.manual_seed(0)
    cfg = dict(TINY, image_size=64, inputs=["rgb", "depth"],
               outputs=["rgb", "depth"], decoder_dim=16, decoder_heads=2, encoder_norm=True)
    return MultiMAE(ModelConfig(**{**cfg, **kw}))


def test_mae_encoder_into_a_multimae_run():
    sd = mae_state_dict(full=True)
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = init_from(m, sd)
    after = m.state_dict()
    assert torch.equal(after["encoder.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(after["encoder_norm.weight"], sd["norm.weight"])
    assert torch.equal(after["global_tokens"], sd["cls_token"])
    assert after["input_adapters.rgb.pos_emb"].shape == (1, 32, 8, 8)  # MAE's table regenerated at 64 px
    fresh = [k for k in after if k.startswith(("output_adapters.", "input_adapters.depth."))]
    assert fresh and all(torch.equal(after[k], before[k]) for k in fresh)
    assert set(fresh) <= set(report.added)
    assert sum("MAE decoder" in why for why in report.dropped.values()) == 20


def test_mismatches_are_errors_or_reported():
    with pytest.raises(ConversionError, match=r"shape mismatches: \['global_tokens"):
        init_from(model(dim=64, num_heads=2), mae_state_dict())
    report = init_from(model(encoder_norm=False), mae_state_dict())
    assert report.dropped["encoder_norm.weight"].startswith("no final norm in this model (model.encoder_norm=true")


def test_inputs_left_out_are_dropped_not_copied():
    """No second model is built: the source's tensors go straight into the run's model, and an
    ``inputs`` override keeps the adapters it leaves out at their initialisation."""
    sd = mae_state_dict()
    m = model()
    before = m.state_dict()["input_adapters.rgb.proj.weight"].clone()
    report = init_from(m, sd, inputs=[])
    after = m.state_dict()
    assert torch.equal(after["input_adapters.rgb.proj.weight"], before)
    assert report.dropped["input_adapters.rgb.proj.weight"] == "input 'rgb' not requested"
    assert torch.equal(after["encoder.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert report.mapped["encoder.0.attn.qkv.weight"] == "blocks.0.attn.qkv.weight"
    assert "input_adapters.rgb.proj.weight" not in report.mapped


def test_run_config_key():
    cfg = load_config(PretrainConfig, None, ["train.init=mae_pretrain_vit_base.pth"])
    assert cfg.train.init == "mae_pretrain_vit_base.pth"
