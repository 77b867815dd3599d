import pytest
import torch

from multimae.core.masking import MaskPlan, dirichlet_plan
from multimae.model.multimae import ModelConfig, MultiMAE
from multimae.model.presets import PRESETS


def small_model(**kw):
    cfg = dict(preset="nano", image_size=64, inputs=["rgb", "depth", "semseg"],
               outputs=["rgb", "depth", "semseg", "norm_rgb"], modalities={"semseg": {"num_classes": 7}})
    cfg.update(kw)
    torch.manual_seed(0)
    return MultiMAE(ModelConfig(**cfg)).eval()


def batch(B=2, S=64, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.randn(B, 1, S, S, generator=g),
            "semseg": torch.randint(0, classes, (B, S // 4, S // 4), generator=g)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    model = MultiMAE(ModelConfig(preset=name, image_size=64)).eval()
    p = PRESETS[name]
    assert len(model.encoder) == p["depth"] and model.global_tokens.shape[-1] == p["dim"]
    b = batch(B=1, classes=133)
    plan = dirichlet_plan(model.token_counts(64), 1, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(b, plan)
    assert out.preds["rgb"].shape == (1, 3, 64, 64)
    assert out.preds["depth"].shape == (1, 1, 64, 64)
    assert out.preds["semseg"].shape == (1, 133, 16, 16)
    assert out.encoded.tokens.shape == (1, 8 + 1, p["dim"])
    assert torch.isfinite(out.loss)


def test_any_image_size_divisible_by_patch():
    model = small_model()
    b = batch(S=96)
    with torch.no_grad():
        out = model(b, dirichlet_plan(model.token_counts(96), 2, 12, generator=torch.Generator().manual_seed(1)))
    assert out.preds["rgb"].shape == (2, 3, 96, 96) and out.preds["semseg"].shape == (2, 7, 24, 24)
    b = {"rgb": torch.randn(1, 3, 48, 80)}
    with torch.no_grad():
        assert model(b).preds["depth"].shape == (1, 1, 48, 80)


def test_loss_ignores_targets_of_visible_tokens():
    model = small_model()
    b = batch()
    plan = dirichlet_plan(model.token_counts(64), 2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(b, plan)
        # change the targets only where tokens were visible (keep the encoder inputs by decoding the same preds)
        b2 = {k: v.clone() for k, v in b.items()}
        vis = ~plan.masks["rgb"].reshape(2, 4, 4)
        px = vis.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand(-1, 3, -1, -1)
        b2["rgb"][px] += 100.0
        l2 = model.losses(out.preds, b2, out.plan)
        b3 = {k: v.clone() for k, v in b.items()}
        b3["rgb"][~px] += 100.0
        l3 = model.losses(out.preds, b3, out.plan)
    assert torch.allclose(l2["rgb"], out.losses["rgb"]) and torch.allclose(l2["norm_rgb"], out.losses["norm_rgb"])
    assert l3["rgb"] > out.losses["rgb"] + 1000


def test_cross_modal_prediction_from_rgb_only():
    model = small_model()
    b = {"rgb": batch()["rgb"]}
    with torch.no_grad():
        out = model(b)
    assert out.encoded.tokens.shape[1] == 16 + 1  # all rgb tokens + global
    assert out.preds["depth"].shape == (2, 1, 64, 64) and out.preds["semseg"].shape == (2, 7, 16, 16)
    assert set(out.losses) == {"rgb", "norm_rgb"}  # no depth/semseg target in the batch


def test_absent_modality_contributes_no_tokens():
    model = small_model()
    b = batch()
    del b["depth"]
    plan = dirichlet_plan(model.token_counts(64), 2, 10, generator=torch.Generator().manual_seed(3))
    plan = plan.subset(["rgb", "semseg"])
    with torch.no_grad():
        out = model(b, plan)
    assert [s.name for s in out.encoded.layout] == ["rgb", "semseg"]
    assert out.encoded.masked.shape[1] == 32


def test_uneven_visible_counts_match_per_sample_results():
    """Samples with different numbers of visible tokens are padded in the encoder; padding must
    not change any real output."""
    model = small_model()
    b = batch(B=2)
    g = torch.Generator().manual_seed(4)
    m0 = dirichlet_plan(model.token_counts(64), 1, 6, generator=g)
    m1 = dirichlet_plan(model.token_counts(64), 1, 14, generator=g)
    joint = MaskPlan({k: torch.cat([m0.masks[k], m1.masks[k]]) for k in m0.masks})
    with torch.no_grad():
        out = model(b, joint)
        assert out.encoded.visible_pad is not None
        for i, m in enumerate([m0, m1]):
            single = model({k: v[i:i + 1] for k, v in b.items()}, m)
            for t in out.preds:
                assert torch.allclose(out.preds[t][i:i + 1], single.preds[t], atol=1e-5), t


def test_new_dense_modality_by_spec_only():
    model = small_model(inputs=["rgb", "normals"], outputs=["normals", "curvature"],
                        modalities={"curvature": {"kind": "dense", "channels": 2, "loss": "l1"}})
    b = {"rgb": torch.randn(2, 3, 64, 64), "normals": torch.randn(2, 3, 64, 64), "curvature": torch.randn(2, 2, 64, 64)}
    out = model(b, dirichlet_plan(model.token_counts(64), 2, 8, generator=torch.Generator().manual_seed(5)))
    assert out.preds["curvature"].shape == (2, 2, 64, 64)
    assert set(out.losses) == {"normals", "curvature"}


def test_clear_errors_on_bad_input():
    model = small_model()
    with pytest.raises(ValueError, match=r"rgb: expected \(B, 3, H, W\)"):
        model({"rgb": torch.randn(1, 4, 64, 64)})
    with pytest.raises(ValueError, match="not divisible by its patch size 16"):
        model({"rgb": torch.randn(1, 3, 60, 64)})
    with pytest.raises(KeyError, match="unknown modality 'thermal'"):
        model({"rgb": torch.randn(1, 3, 64, 64), "thermal": torch.randn(1, 1, 64, 64)})
    with pytest.raises(ValueError, match=r"semseg: class id 7 out of range \[0, 7\)"):
        model.eval()({"semseg": torch.full((1, 16, 16), 7)})  # training trusts the data path's check
    model.train()
    with pytest.raises(ValueError, match="different image sizes"):
        model({"rgb": torch.randn(1, 3, 64, 64), "depth": torch.randn(1, 1, 32, 32)})
    with pytest.raises(KeyError, match="unknown model preset 'huge'"):
        MultiMAE(ModelConfig(preset="huge"))
    with pytest.raises(KeyError, match="unknown modality 'foo'"):
        MultiMAE(ModelConfig(preset="nano", inputs=["foo"]))
    with pytest.raises(ValueError, match="output-only"):
        MultiMAE(ModelConfig(preset="nano", inputs=["norm_rgb"]))


def test_gradients_reach_every_trainable_parameter():
    model = small_model().train()
    out = model(batch(), dirichlet_plan(model.token_counts(64), 2, 16, generator=torch.Generator().manual_seed(6)))
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_shared_tiny_model_is_the_documented_size_and_trains(tiny_model):
    """The tiny model most tests share (tests/helpers/tiny.py): the sizes it promises, and one
    masked forward / backward on 32-px inputs reaches every trainable parameter."""
    assert len(tiny_model.encoder) == 2 and tiny_model.global_tokens.shape[-1] == 32
    assert tiny_model.token_counts(32) == {"rgb": 16, "depth": 16, "semseg": 16}
    model = tiny_model.train()
    plan = dirichlet_plan(model.token_counts(32), 2, 12, generator=torch.Generator().manual_seed(7))
    out = model(batch(S=32, classes=133), plan)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
