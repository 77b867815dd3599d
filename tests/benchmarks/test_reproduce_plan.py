"""``benchmarks/reproduce.py`` job planning and claim wiring (no training): ``--plan`` stages run
in order, seed by seed, with their own seeds, without repeating a job; caption scoring only for
the caption-predicting arms; every claim names existing columns and arms."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce_under_test", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_plan_stages_order_seeds_and_dedupe(rp) -> None:
    b = rp.Budget(seeds=3, arms=("mae", "m3ae", "m3ae_t15", "scratch"), tasks=("probe_rgb", "caption"))
    plan = [(("mae", "m3ae", "scratch"), ("probe_rgb", "caption"), None),
            (("m3ae_t15", "m3ae"), ("probe_rgb", "caption"), (0, 1, 7))]  # seed 7 >= --seeds: dropped
    names = [j.name for j in rp.build_jobs(b, plan)]
    assert len(names) == len(set(names))  # m3ae's jobs are not repeated by the second stage
    assert names.index("pretrain/m3ae-s2") < names.index("pretrain/m3ae_t15-s0")  # stage 1 first
    assert names.index("pretrain/m3ae_t15-s1") < names.index("transfer/caption/m3ae_t15-s1")
    assert not any("m3ae_t15-s2" in n or "-s7" in n for n in names)
    assert "transfer/caption/m3ae-s0" in names and "transfer/caption/m3ae_t15-s0" in names
    assert not any(n.startswith("transfer/caption/") and ("mae-" in n.split("/")[-1][:4] or "scratch" in n)
                   for n in names)  # no caption to score for MAE or scratch
    deps = {j.name: j.deps for j in rp.build_jobs(b, plan)}
    assert deps["transfer/probe_rgb/m3ae_t15-s1"] == ["pretrain/m3ae_t15-s1"]
    assert deps["transfer/probe_rgb/scratch-s0"] == []


def test_default_plan_is_every_arm_and_task_seed_by_seed(rp) -> None:
    b = rp.Budget(seeds=2)
    jobs = rp.build_jobs(b)
    assert {j.arm for j in jobs} == set(rp.ARMS)
    assert {j.task for j in jobs if j.stage == "transfer"} == set(rp.DEFAULT_TASKS)
    first_s1 = next(i for i, j in enumerate(jobs) if j.seed == 1)
    assert all(j.seed == 0 for j in jobs[:first_s1])


def test_claims_name_existing_columns_and_arms(rp) -> None:
    headers = {h for _, _, h, _ in rp.COLUMNS}
    for cid, _, _, comps in rp.CLAIMS:
        for a, b, col, direction in comps:
            for ref in (a, b):
                arm, c = ref.split(":", 1) if ":" in ref else (ref, col)
                assert arm in rp.ALL_ARMS, (cid, arm)
                assert c in headers, (cid, c)
            assert direction in "<>"
    assert set(rp.PROBE_ATTR) == {t for t, (_, _, k) in rp.TASKS.items() if k in ("probe", "ood")}


def test_judge_on_made_up_stats(rp) -> None:
    """The rule: disjoint intervals in the claimed direction reproduce, overlapping are inconclusive."""
    nan = float("nan")
    stats = {a: {h: (nan, nan, 0) for _, _, h, _ in rp.COLUMNS} for a in rp.ALL_ARMS}
    stats["m3ae"]["probe position top-1"] = (70.0, 1.0, 3)
    stats["mae"]["probe position top-1"] = (60.0, 1.0, 3)
    stats["m3ae"]["OOD AUROC (MSP)"] = (55.0, 3.0, 3)
    stats["mae"]["OOD AUROC (MSP)"] = (54.0, 3.0, 3)
    got = {c["id"]: c for c in rp.judge(stats)}
    assert got["C4"]["overall"] == "reproduced" and len(got["C4"]["comparisons"]) == 1
    assert got["C5"]["overall"] == "inconclusive"
    assert got["C6"]["overall"] == "not run"
