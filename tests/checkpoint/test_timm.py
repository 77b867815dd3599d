"""timm out and in: our rgb encoder as a timm VisionTransformer state dict, and timm ViT weights as our encoder."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from multimae import ModelConfig, MultiMAE
from multimae.checkpoint.convert import ConversionError
from multimae.checkpoint.vit import TIMM_NAMES, to_timm_state_dict
from weights_testutils import timm_features, timm_vit
from tiny import TINY


def tiny_multimae(**kw):
    torch.manual_seed(0)
    cfg = dict(TINY, inputs=["rgb", "depth"], outputs=["rgb"], decoder_dim=16, decoder_heads=2)
    model = MultiMAE(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def exported_vit(model, **kw):
    sd, kwargs, report = to_timm_state_dict(model, **kw)
    kwargs.pop("model_name", None)
    vit = VisionTransformer(**kwargs).eval()
    vit.load_state_dict(sd, strict=True)
    return vit, report


def test_export_gives_timm_the_same_features():
    model = tiny_multimae()
    vit, report = exported_vit(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
        blocks_out = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    theirs = timm_features(vit, x)
    # MultiMAE has no final norm: timm gets an identity-affine one, so its blocks give our tokens
    # exactly and forward_features gives LayerNorm(our tokens)
    assert (torch.cat([blocks_out[:, 1:], blocks_out[:, :1]], 1) - ours).abs().max() < 1e-5
    assert (F.layer_norm(ours, (32,), eps=1e-6) - theirs).abs().max() < 1e-5
    assert "norm.weight, norm.bias" in report.added
    assert {k.split(".")[1] for k in report.dropped if k.startswith("input_adapters")} == {"depth"}


def test_export_with_final_norm_and_other_size_is_exact():
    model = tiny_multimae(encoder_norm=True, inputs=["rgb"], outputs=[])
    vit, report = exported_vit(model, image_size=48)  # sine-cosine table regenerated for 6x6
    assert report.resized
    big = tiny_multimae(encoder_norm=True, inputs=["rgb"], outputs=[], image_size=48)
    big.load_state_dict({**model.state_dict(), "input_adapters.rgb.pos_emb": big.input_adapters["rgb"].pos_emb})
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = big.encode({"rgb": x}).tokens
    assert (ours - timm_features(vit, x)).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "huge"])
def test_named_presets_match_timm_keys_and_shapes(preset):
    size = dict(huge=dict(preset="large", dim=1280, depth=32, num_heads=16, patch_size=14)).get(preset, {"preset": preset})
    name = next(n for n in TIMM_NAMES.values() if f"_{preset}_" in n)
    with torch.device("meta"):  # shapes only: ViT-H in a blink
        model = MultiMAE(ModelConfig(**size, inputs=["rgb"], outputs=[]))
        sd, kwargs, _ = to_timm_state_dict(model)
        ref = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    assert kwargs["model_name"] == name
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_timm_weights_import_as_rgb_encoder_and_round_trip():
    vit = timm_vit(dim=32, depth=2, heads=2, patch=8, size=32)  # learned position table
    model, report = MultiMAE.from_pretrained(vit.state_dict(), with_report=True, num_heads=2)
    assert report.kind == "timm" and not report.dropped and not report.added
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
    assert (ours - timm_features(vit, x)).abs().max() < 1e-5
    back, _, _ = to_timm_state_dict(model)
    own = vit.state_dict()
    assert set(back) == set(own)
    for k in own:  # lossless, up to the class position folded into the class token
        if k not in ("cls_token", "pos_embed"):
            assert torch.equal(back[k], own[k]), k
    assert torch.allclose(back["cls_token"] + back["pos_embed"][:, :1], own["cls_token"] + own["pos_embed"][:, :1])


def test_timm_learned_table_resampled_at_a_larger_size():
    vit = timm_vit(dim=32, depth=2, heads=2, patch=8, size=32)
    model, report = MultiMAE.from_pretrained(vit.state_dict(), with_report=True, num_heads=2, image_size=64)
    assert report.resized["input_adapters.rgb.pos_emb"] == "4x4 -> 8x8 resampled (bicubic)"
    big = timm_vit(dim=32, depth=2, heads=2, patch=8, size=64)
    sd = dict(vit.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [8, 8], num_prefix_tokens=1, antialias=False)
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
    assert (ours - timm_features(big, x)).abs().max() < 1e-5


def test_unsupported_timm_variants_are_named():
    vit = timm_vit(dim=32, depth=1, heads=2, patch=8, size=32, init_values=1e-5)  # layer scale
    with pytest.raises(ConversionError, match=r"blocks\.0\.ls1\.gamma"):
        MultiMAE.from_pretrained(vit.state_dict(), with_report=True)
    with pytest.raises(ConversionError, match="no 'depth' input"):
        to_timm_state_dict(tiny_multimae(inputs=["rgb"]), input_name="depth")
