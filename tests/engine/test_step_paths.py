"""Training-step paths: CPU bf16 autocast against fp32, and per-task loss weights."""
import copy

import pytest
import torch

from multimae import ModelConfig, MultiMAE, dirichlet_plan
from multimae.core.config import load_config
from multimae.data import collate
from multimae.data.synthetic import SyntheticScenes
from multimae.data.transforms import PairedTransform
from multimae.tasks.pretrain_config import PretrainConfig
from multimae.engine.step import read_stats, train_step


def _model(**kw) -> MultiMAE:
    torch.manual_seed(0)
    return MultiMAE(ModelConfig(preset="nano", depth=2, image_size=32, patch_size=8,
                                modalities={"semseg": {"num_classes": 6}}, **kw))


def _batch(model: MultiMAE, n: int = 4):
    tf = PairedTransform(list(model.input_specs.values()), 32, train=False)
    ds = SyntheticScenes(n, image_size=32, seed=5, modalities=["rgb", "depth", "semseg"])
    batch = collate([tf(ds[i]) for i in range(n)])
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    plan = dirichlet_plan(model.token_counts(32), n, 12, 1.0, generator=torch.Generator().manual_seed(0))
    return batch, plan


def test_cpu_bf16_step_is_finite_and_close_to_fp32():
    ref = _model()
    low = copy.deepcopy(ref)
    batch, plan = _batch(ref)
    stats = {}
    for name, model in (("fp32", ref), ("bf16", low)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stats[name] = read_stats(train_step(model, batch, opt, plan, precision=name))
    for k, v in stats["bf16"].items():
        assert torch.isfinite(torch.tensor(v)), (k, v)
    for task in ("rgb", "depth", "semseg"):  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
        assert stats["bf16"][f"loss/{task}"] == pytest.approx(stats["fp32"][f"loss/{task}"], rel=3e-2)
    g32 = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g16 = torch.cat([p.grad.flatten() for p in low.parameters()])
    assert g16.dtype == torch.float32 and bool(torch.isfinite(g16).all())
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert stats["bf16"]["grad_norm"] == pytest.approx(stats["fp32"]["grad_norm"], rel=5e-2)
    # the step really ran in bf16 (a silent fp32 fallback would match far closer than 1e-5)
    assert abs(stats["bf16"]["loss"] - stats["fp32"]["loss"]) > 1e-6


def test_loss_weights_change_the_total_as_configured():
    cfg = load_config(PretrainConfig, None, ["model.preset=nano", "model.depth=2", "model.image_size=32",
                                             "model.patch_size=8", "model.modalities={semseg: {num_classes: 6}}",
                                             "model.loss_weights={depth: 0.0, semseg: 2.0}"])
    assert cfg.model.loss_weights == {"depth": 0.0, "semseg": 2.0}
    torch.manual_seed(0)
    weighted = MultiMAE(cfg.model)
    plain = _model()
    plain.load_state_dict(weighted.state_dict())
    batch, plan = _batch(plain)
    out_w, out_p = weighted(batch, plan), plain(batch, plan)
    for t in ("rgb", "depth", "semseg"):  # the per-task losses do not depend on the weights
        assert torch.equal(out_w.losses[t], out_p.losses[t])
    l = out_p.losses
    assert torch.allclose(out_p.loss, l["rgb"] + l["depth"] + l["semseg"])
    assert torch.allclose(out_w.loss, l["rgb"] + 2.0 * l["semseg"])
    assert not torch.allclose(out_w.loss, out_p.loss)
    out_w.loss.backward()
    out_p.loss.backward()
    # a decoder sees only its own loss: weight 0 -> no gradient, weight 2 -> twice the gradient
    dw, dp = weighted.output_adapters, plain.output_adapters
    assert not bool(dw["depth"].out_proj.weight.grad.any()) and bool(dp["depth"].out_proj.weight.grad.any())
    assert torch.allclose(dw["semseg"].out_proj.weight.grad, 2 * dp["semseg"].out_proj.weight.grad, rtol=1e-5, atol=1e-8)
    assert torch.equal(dw["rgb"].out_proj.weight.grad, dp["rgb"].out_proj.weight.grad)
    # and the step reports the weighted total
    stats = read_stats(train_step(weighted, batch, torch.optim.SGD(weighted.parameters(), lr=0.0), plan))
    assert stats["loss"] == pytest.approx(float(out_w.loss.detach()), rel=1e-6)
