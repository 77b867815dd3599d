"""FSDP2 (``train.parallel=fsdp``), activation checkpointing and sharded checkpoints, on 2 CPU
processes over gloo: the same losses as DDP, an exact resume after SIGKILL, and checkpoints the
usual loaders read. The 2-process trainings of several tests run once, in one process group
(module fixture ``runs``): each process start costs seconds on a loaded machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from multimae.checkpoint import CheckpointError, find_latest, load_meta, load_weights

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
PRE_CONFIG = "configs/pretrain/synthetic-tiny.yaml"
PRE = ["model.preset=nano", "model.depth=2", "model.image_size=32", "model.drop_path=0.1", "data.image_size=32",
       "data.num_samples=64", "data.num_workers=0", "data.cache=false", "mask.num_visible=12", "train.batch_size=4",
       "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=0", "train.log_every=1",
       "train.figure_at_end=false"]
FSDP = ["train.parallel=fsdp", "train.activation_checkpointing=true"]
FT_CONFIG = "configs/finetune/synthetic-semseg.yaml"
FT = ["model.encoder={preset: nano, dim: 48, depth: 2, num_heads: 2, patch_size: 8, image_size: 32, "
      "modalities: {semseg: {num_classes: 6}}}", "model.head.embed_dim=64", "data.image_size=32",
      "data.num_workers=0", "data.train_samples=32", "data.val_samples=8", "train.batch_size=4",
      "train.eval_batch_size=8", "train.epochs=1", "train.log_every=1", "train.ckpt_every=2"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a later line of a step, e.g. after a resume, wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = rec["loss"]
    return out


def _v1_name(key: str) -> str:
    """A fine-tuning parameter's name in checkpoint format 1 (the encoder under ``encoder.blocks.<i>``,
    ``encoder.input_adapters``, ``encoder.global_tokens``, ``encoder.norm``)."""
    import re

    for rx, to in ((r"^encoder\.(\d+)\.", r"encoder.blocks.\1."), (r"^input_adapters\.", "encoder.input_adapters."),
                   (r"^global_tokens$", "encoder.global_tokens"), (r"^encoder_norm\.", "encoder.norm.")):
        if re.match(rx, key):
            return re.sub(rx, to, key, count=1)
    return key


def as_format_1(src: Path, dst: Path) -> None:
    """Copy the FSDP fine-tuning checkpoint ``src`` to ``dst`` as format 1 wrote it: old names in the
    weights, in the DCP shards (model and optimizer) and ``format_version`` 1 in meta.json."""
    import shutil

    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sharded"))
    save_file({_v1_name(k): v for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors")
    meta = json.loads((src / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    whole = dst.parent / "whole.pt"
    dcp_to_torch_save(src / "sharded", whole)
    sd = torch.load(whole, weights_only=False)
    osd = sd["optimizer"]
    sd = {"model": {_v1_name(k): v for k, v in sd["model"].items()},
          "optimizer": {"state": {_v1_name(k): v for k, v in osd["state"].items()},
                        "param_groups": [{**g, "params": [_v1_name(n) for n in g["params"]]}
                                         for g in osd["param_groups"]]}}
    assert any(k.startswith("encoder.blocks.") for k in sd["model"])
    torch.save(sd, whole)
    torch_save_to_dcp(whole, dst / "sharded")
    for rng in (src / "sharded").glob("rng-rank*.pt"):
        shutil.copy(rng, dst / "sharded" / rng.name)


# ------------------------------------------------------------------------ the shared 2-process runs
def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    os.chdir(ROOT)
    torch.set_num_threads(1)
    from multimae.engine import distributed as D
    from multimae.core.config import load_config
    from multimae.tasks.pretrain_config import PretrainConfig
    from multimae.engine.trainer import Trainer
    from multimae.tasks.finetune import FinetuneTask
    from multimae.tasks.finetune_config import FinetuneConfig
    from multimae.tasks.pretrain import PretrainTask

    D.init_distributed("gloo")
    try:
        def pre(name: str, *extra: str) -> Trainer:
            return Trainer(PretrainTask(load_config(PretrainConfig, PRE_CONFIG, PRE + [
                f"train.out_dir={out}", f"train.run_name={name}", *extra])))

        pre("pre-ddp").fit(evaluate=False)
        # bf16 parameters / reductions, with the semseg decoder kept in fp32 (its own fp32 FSDP unit)
        pre("pre-fsdp-bf16", *FSDP, "train.precision=bf16", "model.fp32_outputs=[semseg]", "train.max_steps=2").fit(evaluate=False)
        pre("pre-fsdp", *FSDP, "train.figure_at_end=false").fit()  # ends with the held-out report on rank 0
        try:  # an FSDP run cannot take a DDP run's checkpoint
            pre("pre-ddp", *FSDP)
        except CheckpointError as e:
            Path(out, f"refused{rank}.txt").write_text(str(e))
        # a DDP run resumes an FSDP checkpoint (DCP gathers the shards into the whole model)
        step4 = Path(out, "pre-fsdp", "checkpoints", "step-000000004")
        pre("ddp-from-fsdp", f"train.resume={step4}").fit(evaluate=False)
        for name, extra in (("ft-ddp", []), ("ft-fsdp", ["train.parallel=fsdp"])):
            Trainer(FinetuneTask(load_config(FinetuneConfig, FT_CONFIG, FT + [
                f"train.out_dir={out}", f"train.run_name={name}", *extra]))).fit()
        # a sharded fine-tuning checkpoint of format 1 (the old encoder names) resumes under FSDP
        v1 = Path(out, "v1-source", "checkpoints", "step-000000002")
        if rank == 0:
            as_format_1(Path(out, "ft-fsdp", "checkpoints", "step-000000002"), v1)
        D.barrier()
        Trainer(FinetuneTask(load_config(FinetuneConfig, FT_CONFIG, FT + [
            f"train.out_dir={out}", "train.run_name=ft-from-v1", "train.parallel=fsdp", f"train.resume={v1}"]))).fit()
    finally:
        D.cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    return out


def test_fsdp_pretraining_matches_ddp(runs):
    ddp, fsdp = losses(runs / "pre-ddp"), losses(runs / "pre-fsdp")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, 7))
    assert ddp[6] != ddp[1]  # it trains
    for s in ddp:  # FSDP + activation checkpointing, drop path on: the same losses as DDP to fp32 rounding
        assert fsdp[s] == pytest.approx(ddp[s], rel=1e-5, abs=1e-6), (s, ddp, fsdp)
    a, b = load_weights(runs / "pre-ddp"), load_weights(runs / "pre-fsdp")
    assert sorted(a) == sorted(b)  # the same state-dict keys as a DDP run
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def test_fsdp_bf16_runs(runs):
    rec = losses(runs / "pre-fsdp-bf16")
    assert sorted(rec) == [1, 2] and all(0 < v < 100 for v in rec.values())
    assert rec[1] == pytest.approx(losses(runs / "pre-ddp")[1], rel=0.05)  # bf16 rounding only
    w = load_weights(runs / "pre-fsdp-bf16")
    assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.float32}  # fp32 master weights


def test_fsdp_finetuning_matches_ddp(runs):
    ddp, fsdp = losses(runs / "ft-ddp"), losses(runs / "ft-fsdp")
    assert sorted(ddp) == sorted(fsdp) and len(ddp) == 4  # 32 samples / (2 ranks x batch 4)
    for s in ddp:
        assert fsdp[s] == pytest.approx(ddp[s], rel=1e-5, abs=1e-6), (s, ddp, fsdp)
    # the end-of-run evaluation (rank 0, on an unsharded copy) scores like the DDP run's
    e_ddp = json.loads((runs / "ft-ddp" / "eval.json").read_text())["metrics"]
    e_fsdp = json.loads((runs / "ft-fsdp" / "eval.json").read_text())["metrics"]
    assert e_fsdp.keys() == e_ddp.keys()
    for k in e_ddp:
        assert e_fsdp[k] == pytest.approx(e_ddp[k], rel=1e-3, abs=1e-3), k


def test_format_1_sharded_finetuning_checkpoint_resumes(runs):
    v1 = runs / "v1-source" / "checkpoints" / "step-000000002"
    from safetensors import safe_open

    with safe_open(v1 / "model.safetensors", "pt") as f:
        assert any(k.startswith("encoder.blocks.") for k in f.keys())
    assert load_meta(v1)["format_version"] == 1
    # resumed at step 2 from the old names, it ends as the run that wrote the checkpoint ended
    resumed, fsdp = losses(runs / "ft-from-v1"), losses(runs / "ft-fsdp")
    assert sorted(resumed) == [3, 4]
    for s in resumed:
        assert resumed[s] == pytest.approx(fsdp[s], rel=1e-5, abs=1e-6), (s, resumed, fsdp)
    a, b = load_weights(runs / "ft-from-v1"), load_weights(runs / "ft-fsdp")
    assert sorted(a) == sorted(b)  # saved again under the current names
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def test_fsdp_checkpoint_layout_and_cross_resume(runs):
    ckpt = find_latest(runs / "pre-fsdp")
    assert ckpt is not None and ckpt.name == "step-000000006"
    assert load_meta(ckpt)["parallel"] == "fsdp"
    sharded = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert ".metadata" in sharded and {"rng-rank0.pt", "rng-rank1.pt"} <= set(sharded)
    assert not [p for p in (runs / "pre-fsdp" / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left
    for r in range(2):
        assert "resume it with train.parallel=ddp" in (runs / f"refused{r}.txt").read_text()
    # DDP resumed FSDP's step 4 (sharded model + AdamW state) and ends where FSDP ended, to rounding
    cross, fsdp = losses(runs / "ddp-from-fsdp"), losses(runs / "pre-fsdp")
    assert sorted(cross) == [5, 6]
    for s in cross:
        assert cross[s] == pytest.approx(fsdp[s], rel=1e-5, abs=1e-6)
    a, b = load_weights(runs / "ddp-from-fsdp"), load_weights(runs / "pre-fsdp")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert (runs / "pre-fsdp" / "eval.md").is_file()  # finish_run on rank 0 after an FSDP run


def test_fsdp_checkpoints_load_in_the_usual_readers(runs, tmp_path):
    from multimae.cli.main import main
    from multimae.model.multimae import MultiMAE

    model = MultiMAE.from_pretrained(runs / "pre-fsdp")
    weights = load_weights(runs / "pre-fsdp")
    sd = model.state_dict()
    assert sorted(sd) == sorted(weights)
    assert all(torch.equal(sd[k], weights[k]) for k in sd)
    # `multimae evaluate` re-scores the FSDP fine-tune from its checkpoint: the numbers of the run's own
    # end-of-training evaluation (which used the live, sharded weights gathered on rank 0)
    assert main(["evaluate", "--checkpoint", str(runs / "ft-fsdp")]) == 0
    again = json.loads((runs / "ft-fsdp" / "eval-val.json").read_text())["metrics"]
    first = json.loads((runs / "ft-fsdp" / "eval.json").read_text())["metrics"]
    assert again == pytest.approx(first, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------ SIGKILL and resume
def _torchrun(port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port),
            "-m", "multimae.cli.main", "pretrain", "--config", PRE_CONFIG, "--no-eval", *args]


def test_sigkill_and_resume_is_exact(runs, tmp_path, free_port):
    args = PRE + FSDP + [f"train.out_dir={tmp_path}", "train.run_name=killed"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_torchrun(free_port(), args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while find_latest(run_dir) is None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
            proc.wait()
    killed_at = find_latest(run_dir)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_at.name != "step-000000006"  # killed before the end
    r = subprocess.run(_torchrun(free_port(), args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    # bitwise: the resumed run ends with the uninterrupted run's weights and logs its losses
    a, b = load_weights(run_dir), load_weights(runs / "pre-fsdp")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run_dir) == losses(runs / "pre-fsdp")


# ------------------------------------------------------------------------ one process
def _nano(**kw):
    from multimae.model.multimae import ModelConfig, MultiMAE

    torch.manual_seed(0)
    return MultiMAE(ModelConfig(preset="nano", depth=2, image_size=32, patch_size=8, drop_path=0.2,
                                modalities={"semseg": {"num_classes": 5}}, **kw))


def _batch():
    from multimae.core.masking import dirichlet_plan

    g = torch.Generator().manual_seed(0)
    batch = {"rgb": torch.randn(4, 3, 32, 32, generator=g), "depth": torch.randn(4, 1, 32, 32, generator=g),
             "semseg": torch.randint(0, 5, (4, 8, 8), generator=g)}
    return batch, dirichlet_plan({"rgb": 16, "depth": 16, "semseg": 16}, 4, 12, generator=g)


def _saved_bytes(model, batch, plan) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd kept for the backward pass (outside checkpoints)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # the drop-path draw
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch, plan).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("decoder", ["per_task", "shared"])
def test_activation_checkpointing_same_losses_and_grads(decoder):
    from multimae.engine import parallel as P

    batch, plan = _batch()
    plain, ckpt = _nano(decoder=decoder), _nano(decoder=decoder)
    n = P.apply_activation_checkpointing(ckpt)
    assert n == len(P.transformer_blocks(ckpt)) >= 2 + 1  # encoder blocks and decoder blocks
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints, optimizer groups
    loss0, g0, b0 = _saved_bytes(plain, batch, plan)
    loss1, g1, b1 = _saved_bytes(ckpt, batch, plan)
    assert torch.equal(loss0, loss1)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7), k
    assert b1 < 0.5 * b0, (b0, b1)  # the blocks' activations were not kept


def test_parallel_config_is_validated():
    from multimae.core.config import ConfigError, load_config
    from multimae.tasks.pretrain_config import PretrainConfig
    from multimae.tasks.finetune_config import FinetuneConfig

    for cls in (PretrainConfig, FinetuneConfig):
        assert load_config(cls, None, []).train.parallel == "ddp"
        assert load_config(cls, None, []).train.activation_checkpointing is False
        with pytest.raises(ConfigError, match=r"train\.parallel.*zero3"):
            load_config(cls, None, ["train.parallel=zero3"])
