import pytest
import torch

from multimae.core.masking import MaskPlan, dirichlet_plan, ratio_plan, sample_dirichlet

COUNTS = {"rgb": 196, "depth": 196, "semseg": 196}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_budget_is_exact_for_every_sample():
    plan = dirichlet_plan(COUNTS, 64, 98, alpha=1.0, generator=gen())
    vis = sum((~m).sum(1) for m in plan.masks.values())
    assert torch.equal(vis, torch.full((64,), 98))


def test_same_seed_same_plan_other_seed_other_plan():
    a = dirichlet_plan(COUNTS, 8, 98, generator=gen(1))
    b = dirichlet_plan(COUNTS, 8, 98, generator=gen(1))
    c = dirichlet_plan(COUNTS, 8, 98, generator=gen(2))
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in COUNTS)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in COUNTS)


def test_shares_follow_the_dirichlet_draw():
    # symmetric Dirichlet(1) over 3 modalities: each share has mean 1/3 and variance 1/18
    plan = dirichlet_plan(COUNTS, 4000, 98, alpha=1.0, generator=gen(3))
    shares = torch.stack([(~plan.masks[k]).sum(1).float() / 98 for k in COUNTS], 1)
    assert torch.allclose(shares.mean(0), torch.full((3,), 1 / 3), atol=0.02)
    assert torch.allclose(shares.var(0), torch.full((3,), 1 / 18), atol=0.01)
    # a small alpha concentrates the budget on one modality
    sharp = dirichlet_plan(COUNTS, 2000, 98, alpha=0.1, generator=gen(4))
    top = torch.stack([(~sharp.masks[k]).sum(1) for k in COUNTS], 1).max(1).values.float() / 98
    assert top.mean() > 0.85


def test_dirichlet_sampler_moments_for_non_unit_alpha():
    a = torch.tensor([[0.5, 2.0, 4.0]]).expand(20000, 3).double()
    x = sample_dirichlet(a, gen(5))
    assert torch.allclose(x.mean(0), torch.tensor([0.5, 2.0, 4.0]) / 6.5, atol=0.01)


def test_tokens_inside_a_modality_are_uniform():
    plan = dirichlet_plan({"rgb": 16, "depth": 16}, 20000, 8, generator=gen(6))
    freq = (~plan.masks["rgb"]).float().mean(0)
    assert (freq - freq.mean()).abs().max() < 0.02


def test_absent_modality_gets_no_tokens_and_budget_goes_elsewhere():
    present = {"depth": torch.tensor([True, False, True, False])}
    plan = dirichlet_plan(COUNTS, 4, 98, generator=gen(7), present=present)
    assert (~plan.masks["depth"][1]).sum() == 0 and (~plan.masks["depth"][3]).sum() == 0
    vis = sum((~m).sum(1) for m in plan.masks.values())
    assert torch.equal(vis, torch.full((4,), 98))


def test_budget_larger_than_a_modality_overflows_to_others():
    plan = dirichlet_plan({"a": 4, "b": 100}, 256, 50, alpha=1.0, generator=gen(8))
    assert ((~plan.masks["a"]).sum(1) <= 4).all()
    assert torch.equal((~plan.masks["a"]).sum(1) + (~plan.masks["b"]).sum(1), torch.full((256,), 50))


def test_subset_presampling_leaves_some_modalities_out():
    plan = dirichlet_plan(COUNTS, 2000, 98, generator=gen(9), sample_subsets=True)
    vis = torch.stack([(~plan.masks[k]).sum(1) for k in COUNTS], 1)
    single = ((vis > 0).sum(1) == 1).float().mean()
    assert 0.35 < single < 0.5  # 3 of the 7 non-empty subsets have one modality (eps-share rounds to 0)
    assert torch.equal(vis.sum(1), torch.full((2000,), 98))


def test_padding_is_never_visible_and_ratios_are_honoured():
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, :10] = True
    valid[1, :4] = True
    valid[2, :7] = True
    plan = ratio_plan({"caption": 10, "rgb": 16}, 3, {"caption": 0.5, "rgb": 0.75}, generator=gen(10),
                      valid={"caption": valid})
    vis = ~plan.masks["caption"]
    assert not (vis & ~valid).any()
    assert vis.sum(1).tolist() == [5, 2, 3]  # n_valid - round(0.5 * n_valid); round(3.5) = 4 hidden
    assert (~plan.masks["rgb"]).sum(1).tolist() == [4, 4, 4]


def test_ratio_range_draws_one_ratio_per_sample():
    B, N = 4000, 20
    plan = ratio_plan({"caption": N, "rgb": 16}, B, {"caption": (0.5, 1.0), "rgb": 0.75}, generator=gen(3))
    hidden = plan.masks["caption"].sum(1).float()
    assert hidden.min() == 10 and hidden.max() == 20  # round(N * ratio) for ratio in [0.5, 1]
    assert abs(hidden.mean().item() / N - 0.75) < 0.01
    assert (hidden == 20).float().mean() > 0.015  # fully masked captions occur (ratio >= 0.975)
    counts = torch.bincount(hidden.long(), minlength=21)[11:20].float()
    assert counts.min() > 0.7 * counts.mean()  # uniform over the interior counts
    assert (plan.masks["rgb"].sum(1) == 12).all()  # a fixed ratio stays exact
    again = ratio_plan({"caption": N, "rgb": 16}, B, {"caption": (0.5, 1.0), "rgb": 0.75}, generator=gen(3))
    assert torch.equal(again.masks["caption"], plan.masks["caption"])
    with pytest.raises(ValueError, match="mask ratio of 'caption'"):
        ratio_plan({"caption": N}, 2, {"caption": (0.9, 0.5)}, gen(0))


def test_user_masks_validated():
    with pytest.raises(ValueError, match="different batch sizes"):
        MaskPlan.from_masks({"rgb": torch.zeros(2, 4), "depth": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"must be \(B, N\)"):
        MaskPlan.from_masks({"rgb": torch.zeros(2, 4, 1)})


def test_every_sampler_needs_an_explicit_generator():
    """No silent fallback to the global RNG: a plan without a generator is a TypeError."""
    from multimae.core.masking import sample_gamma, select_uniform

    with pytest.raises(TypeError, match="generator"):
        dirichlet_plan(COUNTS, 2, 8)
    with pytest.raises(TypeError, match="generator"):
        ratio_plan({"rgb": 16}, 2, {"rgb": 0.5})
    with pytest.raises(TypeError, match="generator"):
        sample_dirichlet(torch.ones(2, 3))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="generator"):
        sample_gamma(torch.ones(3))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="generator"):
        select_uniform(4, torch.tensor([2]), None)  # type: ignore[call-arg]


@pytest.mark.parametrize("seed", range(6))
def test_a_plan_knows_its_budget_without_reading_its_masks(seed):
    """``num_visible`` bounds every sample's visible tokens and is the same for every batch of a
    run (static shapes); ``uneven`` is False exactly when every sample reaches it; ``counted``
    reads the same off the masks (the tight bound)."""
    g = torch.Generator().manual_seed(seed)
    counts = {"rgb": 16, "caption": 10}
    valid = {"caption": torch.arange(10)[None] < torch.randint(0, 11, (5, 1), generator=g)}
    present = {"rgb": torch.rand(5, generator=g) > 0.3}
    plans = [dirichlet_plan(counts, 5, 12, generator=g), dirichlet_plan(counts, 5, 40, generator=g),
             dirichlet_plan(counts, 5, 12, generator=g, valid=valid, present=present),
             ratio_plan(counts, 5, {"rgb": 0.75, "caption": 0.5}, g),
             ratio_plan(counts, 5, {"rgb": 0.75, "caption": (0.5, 0.9)}, g, valid=valid, present=present)]
    assert [p.num_visible for p in plans] == [12, 26, 12, 4 + 5, 4 + 5]
    for p in plans:
        total = sum((~m).sum(1) for m in p.masks.values())
        assert int(total.max()) <= p.num_visible
        assert p.uneven == bool((total < p.num_visible).any())
        c = MaskPlan(dict(p.masks)).counted()
        assert c.num_visible == int(total.max()) and c.uneven == bool((total < c.num_visible).any())
        assert c.to("cpu").num_visible == c.num_visible  # moving a plan keeps its budget
    assert not plans[0].uneven and not plans[1].uneven and not plans[3].uneven
    full = MaskPlan.all_visible(counts, 3)
    assert full.num_visible == 26 and not full.uneven
