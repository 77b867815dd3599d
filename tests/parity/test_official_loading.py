"""Loading official checkpoints: any size, .pth with a 'model' entry, exact key errors."""
import argparse

import pytest
import torch

from multimae.checkpoint.convert import ConversionError, read_state_dict
from multimae.model.multimae import MultiMAE


def official_base_state(tsv):
    sd = {}
    for line in tsv.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        sd[key] = torch.randn(dims) * 0.02
    return sd


def test_full_size_official_layout_loads_every_key(tmp_path, official_tsv):
    sd = official_base_state(official_tsv)
    assert len(sd) == 351
    path = tmp_path / "multimae-b.pth"
    torch.save({"model": sd, "epoch": 1599, "args": argparse.Namespace(lr=1e-4)}, path)
    model = MultiMAE.from_pretrained(path)
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.image_size) == (768, 12, 12, 224)
    assert model.input_specs["semseg"].num_classes == 133
    own = model.state_dict()
    assert set(own) == set(sd)
    for k in ("encoder.11.mlp.fc2.weight", "output_adapters.semseg.out_proj.weight", "global_tokens"):
        assert torch.equal(own[k], sd[k])


def test_missing_and_unexpected_keys_are_listed(official_tsv):
    sd = official_base_state(official_tsv)
    del sd["encoder.3.attn.proj.bias"]
    sd["encoder.0.extra"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"missing keys: \['encoder.3.attn.proj.bias'\].*unexpected keys: \['encoder.0.extra'\]"):
        MultiMAE.from_pretrained(sd)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(ConversionError, match="evil.pth"):
        read_state_dict(path)
