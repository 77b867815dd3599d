"""facebookresearch/mae checkpoints in: encoder-only and _full .pth files, any image size."""
import pytest
import torch
import torch.nn.functional as F

from multimae import MultiMAE
from weights_testutils import mae_sincos, mae_state_dict, timm_features, timm_vit

DIM, DEPTH, PATCH, GRID = 32, 2, 8, 4


def reference(sd, size, grid=None):
    """MAE's encoder is a timm ViT with the same names: its forward_features is the reference."""
    vit = timm_vit(DIM, DEPTH, heads=2, patch=PATCH, size=size)
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    if grid is not None:  # the fixed table MAE would build for that grid
        gh, gw = grid
        enc["pos_embed"] = torch.cat([torch.zeros(1, DIM), mae_sincos(DIM, gh, gw)])[None]
    vit.load_state_dict(enc, strict=True)
    return vit


@pytest.mark.parametrize("full", [False, True], ids=["encoder-only", "full"])
def test_mae_pth_loads_as_rgb_encoder_with_equal_features(tmp_path, full):
    sd = mae_state_dict(DIM, DEPTH, PATCH, GRID, full=full)
    path = tmp_path / ("mae_pretrain_vit_tiny_full.pth" if full else "mae_pretrain_vit_tiny.pth")
    torch.save({"model": sd}, path)
    model, report = MultiMAE.from_pretrained(path, with_report=True, num_heads=2)
    cfg = model.config
    assert report.kind == "mae"
    assert (cfg.dim, cfg.depth, cfg.patch_size, cfg.image_size, cfg.inputs, cfg.outputs, cfg.encoder_norm) == \
        (DIM, DEPTH, PATCH, PATCH * GRID, ["rgb"], [], True)
    # the class token (with its zero class position) became the global token
    assert torch.equal(model.global_tokens, sd["cls_token"])
    dec = sorted(k for k in sd if k.startswith(("decoder_", "mask_token")))
    assert sorted(report.dropped) == dec and len(dec) == (20 if full else 0)
    assert all("MAE decoder" in why for why in report.dropped.values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
    assert (ours - timm_features(reference(sd, 32), x)).abs().max() < 1e-5


def test_mae_at_a_larger_and_a_non_square_size(tmp_path):
    sd = mae_state_dict(DIM, DEPTH, PATCH, GRID)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    # 32 px -> 64 px (the 224 -> 384 kind of change): MAE's sine-cosine table is regenerated, not resampled
    model, report = MultiMAE.from_pretrained(tmp_path / "mae.pth", with_report=True, num_heads=2, image_size=64)
    assert report.resized == {"input_adapters.rgb.pos_emb": "4x4 -> 8x8 regenerated (cols_first sine-cosine)"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
    assert (ours - timm_features(reference(sd, 64, (8, 8)), x)).abs().max() < 1e-5
    # a non-square image: the 8x8 table resampled to 4x8 at run time (bicubic), tokens row-major
    x = torch.randn(1, 3, 32, 64)
    vit = reference(sd, (32, 64), (4, 8))
    table = model.input_adapters["rgb"].pos_emb
    with torch.no_grad():
        vit.pos_embed[:, 1:] = F.interpolate(table, size=(4, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        ours = model.encode({"rgb": x}).tokens
    assert ours.shape == (1, 4 * 8 + 1, DIM)
    assert (ours - timm_features(vit, x)).abs().max() < 1e-5


def test_mae_encoder_with_new_multimae_decoders_and_without_norm(tmp_path):
    sd = mae_state_dict(DIM, DEPTH, PATCH, GRID, full=True)
    model, report = MultiMAE.from_pretrained(sd, with_report=True, num_heads=2, outputs=["rgb", "depth"], encoder_norm=False,
                                    decoder_dim=16, decoder_heads=2)
    assert set(report.dropped) >= {"encoder_norm.weight", "encoder_norm.bias"}
    assert {k.split(".")[1] for k in report.added} == {"rgb", "depth"}
    assert all("freshly initialised" in why for why in report.added.values())
    out = model({"rgb": torch.randn(1, 3, 32, 32)})
    assert out.preds["depth"].shape == (1, 1, 32, 32)
    assert isinstance(model, MultiMAE)
