"""model.fp32_outputs: the listed decoders run in fp32 under mixed-precision autocast (the
official recipe's ``fp32_output_adapters: semseg``); the others follow autocast."""
import pytest
import torch

from multimae import MultiMAE, dirichlet_plan
from tiny import tiny_config


def _model(**kw) -> MultiMAE:
    torch.manual_seed(0)
    return MultiMAE(tiny_config(outputs=["rgb", "depth", "semseg", "norm_rgb"],
                                modalities={"semseg": {"num_classes": 6}}, **kw))


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
            "semseg": torch.randint(0, 6, (2, 8, 8), generator=g)}


def test_listed_decoder_runs_in_fp32_under_bf16_autocast():
    model = _model(fp32_outputs=["semseg"])
    batch = _batch()
    plan = dirichlet_plan(model.token_counts(32), 2, 12, 1.0, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, plan)
    assert out.preds["semseg"].dtype == torch.float32
    assert out.preds["rgb"].dtype == out.preds["norm_rgb"].dtype == torch.bfloat16
    # exactly the fp32 decoder applied to the (bf16-computed) encoder tokens promoted to fp32
    from dataclasses import replace

    grid = (4, 4)
    ref = model.output_adapters["semseg"](replace(out.encoded, tokens=out.encoded.tokens.float()), grid)
    assert torch.equal(out.preds["semseg"], ref)
    out.loss.backward()
    assert model.output_adapters["semseg"].out_proj.weight.grad is not None

    plain = _model()  # same weights, no fp32 decoder: semseg follows autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(batch, plan).preds["semseg"].dtype == torch.bfloat16


def test_fp32_outputs_must_name_outputs():
    with pytest.raises(ValueError, match=r"fp32_outputs.*\['normals'\]"):
        _model(fp32_outputs=["normals"])
