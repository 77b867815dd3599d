"""``multimae convert``: any supported source to a pretrained directory or a timm state dict, with a report."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from multimae import MultiMAE
from multimae.cli.main import main
from weights_testutils import mae_state_dict, timm_features


def test_mae_to_multimae_to_timm(tmp_path, capsys):
    torch.save({"model": mae_state_dict(full=True)}, tmp_path / "mae_full.pth")
    assert main(["convert", str(tmp_path / "mae_full.pth"), str(tmp_path / "mm"), "--num-heads", "2",
                 "--image-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "(mae): 30 tensors mapped, 20 dropped, 0 added, 1 position tables resized" in out
    assert "dropped: mask_token, decoder_embed.weight, decoder_embed.bias, decoder_pos_embed, ... (20 keys) -- MAE decoder (unused" in out
    assert "4x4 -> 6x6 regenerated (cols_first sine-cosine)" in out
    model = MultiMAE.from_pretrained(tmp_path / "mm")
    assert model.config.image_size == 48 and "mae_full.pth (mae)" in (tmp_path / "mm" / "README.md").read_text()

    assert main(["convert", str(tmp_path / "mm"), str(tmp_path / "vit.safetensors"), "--to", "timm"]) == 0
    out = capsys.readouterr().out
    assert "VisionTransformer(**{'img_size': 48, 'patch_size': 8" in out
    with safe_open(str(tmp_path / "vit.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    vit = VisionTransformer(**kwargs).eval()
    vit.load_state_dict(load_file(str(tmp_path / "vit.safetensors")), strict=True)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ours = model.encode({"rgb": x}).tokens
    assert (ours - timm_features(vit, x)).abs().max() < 1e-5
    # and back in: the head count comes from the file's metadata
    again = MultiMAE.from_pretrained(tmp_path / "vit.safetensors")
    assert again.config.num_heads == 2
    with torch.no_grad():
        assert (again.encode({"rgb": x}).tokens - ours).abs().max() < 1e-5


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.pth does not exist" in err and "\n" not in err

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": mae_state_dict(), "x": Payload()}, tmp_path / "crafted.pth")
    assert main(["convert", str(tmp_path / "crafted.pth"), str(tmp_path / "out")]) == 2
    cap = capsys.readouterr()
    assert "crafted.pth: cannot be read as a weights-only PyTorch checkpoint" in cap.err
    assert "this must never run" not in cap.out
    assert not (tmp_path / "out").exists()

    torch.save({"model": mae_state_dict()}, tmp_path / "mae.pth")
    assert main(["convert", str(tmp_path / "mae.pth"), str(tmp_path / "vit.pth"), "--to", "timm",
                 "--num-heads", "2"]) == 2
    assert "writes a .safetensors file" in capsys.readouterr().err
