"""save_pretrained / from_pretrained: the directory layout, every source, overrides, sizes, safety."""
import json

import pytest
import torch

from multimae import ModelConfig, MultiMAE
from multimae.checkpoint import CheckpointError, save_checkpoint
from multimae.checkpoint.convert import ConversionError
from multimae.core.config import to_dict
from multimae.tasks.pretrain_config import PretrainConfig
from tiny import TINY

CFG = dict(TINY, decoder_dim=16, decoder_depth=1, decoder_heads=2, modalities={"semseg": {"num_classes": 5}})


def small_model():
    torch.manual_seed(0)
    return MultiMAE(ModelConfig(**CFG)).eval()


def batch(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(2, 3, size, size, generator=g), "depth": torch.randn(2, 1, size, size, generator=g),
            "semseg": torch.randint(0, 5, (2, size // 4, size // 4), generator=g)}


def preds(model, b):
    with torch.no_grad():
        return model(b, compute_loss=False).preds


def test_save_pretrained_layout_round_trip(tmp_path):
    model = small_model()
    out = model.save_pretrained(tmp_path / "tiny-mm")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "multimae" and cfg["format_version"] == 1
    assert cfg["model"] == to_dict(model.config)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: multimae\nlicense: apache-2.0")
    for text in ("semseg (categorical, 5 classes)", "nano (32-d, 2 blocks", 'MultiMAE.from_pretrained("tiny-mm")',
                 "training steps | unknown"):
        assert text in card, text
    loaded = MultiMAE.from_pretrained(out)
    assert loaded.config == model.config and not loaded.training
    b = batch()
    for t, p in preds(model, b).items():
        assert torch.equal(p, preds(loaded, b)[t]), t


def test_run_directory_with_training_record(tmp_path):
    model = small_model()
    meta = {"config": to_dict(PretrainConfig(model=ModelConfig(**CFG))), "epoch": 1}
    save_checkpoint(tmp_path / "run", 40, model.state_dict(), {"step": 40}, meta)
    loaded, report = MultiMAE.from_pretrained(tmp_path / "run", with_report=True)
    assert report.kind == "multimae" and "step-000000040" in report.source
    assert loaded.provenance["training"]["steps"] == 40
    out = loaded.save_pretrained(tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert "training steps | 40 |" in card and "built-in synthetic scenes" in card
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 40
    b = batch()
    assert torch.equal(preds(model, b)["depth"], preds(MultiMAE.from_pretrained(out), b)["depth"])


def test_encoder_only_and_input_subset_overrides(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m")
    enc, report = MultiMAE.from_pretrained(tmp_path / "m", with_report=True, inputs=["rgb"], outputs=[])
    assert list(enc.input_adapters) == ["rgb"] and len(enc.output_adapters) == 0
    assert {why for why in report.dropped.values()} == {"input 'depth' not requested", "input 'semseg' not requested",
                                                        "output 'rgb' not requested", "output 'depth' not requested",
                                                        "output 'semseg' not requested"}
    x = batch()["rgb"]
    out = enc({"rgb": x})  # a MultiMAE with no outputs: encoder tokens, no predictions, no loss
    assert out.preds == {} and out.loss is None
    with torch.no_grad():
        assert torch.equal(out.encoded.tokens, model.encode({"rgb": x}).tokens)
    with pytest.raises(ConversionError, match="unknown model setting.*'imagesize'"):
        MultiMAE.from_pretrained(tmp_path / "m", with_report=True, imagesize=64)


def test_other_image_size_keeps_predictions_at_the_original_size(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m")
    big, report = MultiMAE.from_pretrained(tmp_path / "m", with_report=True, image_size=64)
    assert len(report.resized) == 6 and all("regenerated (rows_first" in v for v in report.resized.values())
    assert preds(big, batch(64))["semseg"].shape == (2, 5, 16, 16)
    assert preds(big, {k: v[..., : v.shape[-1] // 2] for k, v in batch(64).items()})["rgb"].shape == (2, 3, 64, 32)
    big.save_pretrained(tmp_path / "big")
    back = MultiMAE.from_pretrained(tmp_path / "big", image_size=32)
    b = batch()
    for t, p in preds(model, b).items():
        assert torch.equal(p, preds(back, b)[t]), t


def test_official_checkpoint_at_other_sizes(tmp_path, golden):
    """The official golden model (48 px) loaded at 96 px runs there; brought back to 48 px it
    predicts exactly the official full-token outputs again."""
    state = {k[len("state."):]: v for k, v in golden.items() if k.startswith("state.")}
    torch.save({"model": state}, tmp_path / "official.pth")
    big = MultiMAE.from_pretrained(tmp_path / "official.pth", num_heads=2, decoder_heads=2, image_size=96)
    assert big.input_adapters["rgb"].pos_emb.shape[-2:] == (6, 6)
    b = {"rgb": golden["input.rgb"], "depth": golden["input.depth"], "semseg": golden["input.semseg"]}
    up = {k: torch.nn.functional.interpolate(v[:, None].float() if k == "semseg" else v, scale_factor=2)
          for k, v in b.items()}
    up["semseg"] = up["semseg"][:, 0].long()
    assert preds(big, up)["rgb"].shape == (2, 3, 96, 96)
    big.save_pretrained(tmp_path / "big")
    back = MultiMAE.from_pretrained(tmp_path / "big", image_size=48)
    for t in ("rgb", "depth", "semseg", "norm_rgb"):
        ref = golden[f"full_pred.{t}"]
        assert ((preds(back, b)[t] - ref).abs().max() / ref.abs().max()) < 1e-5, t


@pytest.mark.slow
def test_official_base_layout_loads_at_384(official_tsv):
    """The issue's case: the official ViT-B checkpoint layout with image_size=384 (was a
    ConversionError on pos_emb): every sine-cosine table is regenerated for the 24x24 grid."""
    sd = {}
    for line in official_tsv.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            sd[key] = torch.zeros(tuple(int(x) for x in shape.strip("()").split(",") if x.strip()))
    for k in [k for k in sd if k.endswith("pos_emb")]:  # the official tables are the fixed sine-cosine ones
        from multimae.model.layers.pos_embed import sincos_2d

        sd[k] = sincos_2d(14, 14, sd[k].shape[1])
    model, report = MultiMAE.from_pretrained(sd, with_report=True, image_size=384, outputs=[])
    assert model.config.image_size == 384 and model.input_adapters["rgb"].pos_emb.shape == (1, 768, 24, 24)
    assert sorted(report.resized) == [f"input_adapters.{n}.pos_emb" for n in ("depth", "rgb", "semseg")]
    assert len(report.dropped) == sum(k.startswith("output_adapters.") for k in sd)


@pytest.fixture
def pickled_pth(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "crafted.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    return path


def test_pickled_payload_is_refused(pickled_pth, capsys):
    with pytest.raises(ConversionError, match=r"crafted\.pth: cannot be read as a weights-only"):
        MultiMAE.from_pretrained(pickled_pth)
    assert "this must never run" not in capsys.readouterr().out


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        MultiMAE.from_pretrained(tmp_path / "nope", with_report=True)
    small_model().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        MultiMAE.from_pretrained(tmp_path / "m", with_report=True)
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match=r"other\.pth: unrecognised state dict.*foo\.weight"):
        MultiMAE.from_pretrained(tmp_path / "other.pth", with_report=True)


def test_official_finetuned_checkpoint_points_to_transfer_or_loads_as_encoder(tmp_path):
    """Item 3 of the issue (fine-tuned checkpoints into transfer models) lives in multimae.model.transfer;
    from_pretrained names it, and with outputs=[] takes the fine-tuned encoder."""
    from pathlib import Path

    from safetensors.torch import load_file

    g = load_file(str(Path(__file__).resolve().parents[1] / "fixtures" / "multimae-official-finetune-compact.safetensors"))
    state = {k[len("state."):]: v for k, v in g.items() if k.startswith("state.")}
    with pytest.raises(ConversionError, match="build_transfer_model"):
        MultiMAE.from_pretrained(state, with_report=True, num_heads=2)
    enc, report = MultiMAE.from_pretrained(state, with_report=True, num_heads=2, outputs=[])
    assert report.dropped and all(k.startswith("output_adapters.") for k in report.dropped)
    b = {"rgb": g["input.rgb"], "depth": g["input.depth"]}
    with torch.no_grad():
        out = enc.encode(b)
    seg = {s.name: out.tokens[:, s.start:s.end] for s in out.layout}
    tokens = torch.cat([seg["rgb"], seg["depth"], out.tokens[:, -1:]], dim=1)  # the golden's order
    assert ((tokens - g["encoder.last"]).abs().max() / g["encoder.last"].abs().max()) < 1e-5
