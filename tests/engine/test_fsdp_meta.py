"""FSDP start-up on the meta device (multimae.engine.parallel): a model built with its parameters
on meta, sharded over 2 CPU processes (gloo) and materialised shard by shard has exactly the
initial weights of a plain (DDP) build of the same seed."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from multimae.engine import parallel as P
from multimae.model.multimae import ModelConfig, MultiMAE

TINY = dict(preset="nano", depth=2, image_size=32, patch_size=8, modalities={"semseg": {"num_classes": 5}})
M3AE = dict(preset="nano", depth=2, image_size=32, patch_size=8, inputs=["rgb", "caption"], outputs=["rgb", "caption"],
            decoder="shared", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            modalities={"caption": {"max_len": 8, "num_classes": 50}})
TEXT = dict(TINY, inputs=["rgb", "caption"], outputs=["rgb", "depth", "caption"],
            modalities={"caption": {"max_len": 8, "num_classes": 50}})


def plain(kw: dict, seed: int = 3) -> MultiMAE:
    torch.manual_seed(seed)
    return MultiMAE(ModelConfig(**kw))


def on_meta(kw: dict, seed: int = 3) -> MultiMAE:
    torch.manual_seed(seed)
    with P.parameters_on_meta():
        return MultiMAE(ModelConfig(**kw))


@pytest.mark.parametrize("kw", [TINY, M3AE, TEXT], ids=["multimae", "m3ae-shared-decoder", "text-decoder"])
def test_meta_build_materialises_to_the_plain_weights(kw):
    model = on_meta(kw)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # position tables computed as usual
    rng = torch.random.get_rng_state()
    P.materialise(model, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    ref = plain(kw).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not torch.equal(ref["global_tokens"], plain(kw, seed=4).state_dict()["global_tokens"])  # seeded


def test_materialise_refuses_a_parameter_left_uninitialised():
    model = on_meta(TINY)
    with P.parameters_on_meta():
        model.extra = nn.Parameter(torch.ones(3))  # not set by reset_parameters
    with pytest.raises(RuntimeError, match=r"does not initialise \['extra'\]"):
        P.materialise(model, torch.device("cpu"))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from multimae.engine import distributed as D

    info = D.init_distributed("gloo")
    try:
        train = SimpleNamespace(parallel="fsdp", activation_checkpointing=True, precision="fp32", init=None,
                                vis_every=0)
        assert P.builds_on_meta(SimpleNamespace(meta_init=True), train, info)
        for name, kw in (("tiny", TINY), ("m3ae", M3AE)):
            model = on_meta(kw)
            P.prepare_model(model, train, info)
            assert P.is_sharded(model) and all(p.is_meta for p in model.parameters())
            P.materialise(model, info.device)
            local = sum(p.to_local().numel() for p in model.parameters())
            sd = P.full_state_dict(model)  # collective; rank 0 gets the tensors
            if rank == 0:
                torch.save({"sd": sd, "local": local}, f"{out}/{name}.pt")
    finally:
        D.cleanup()


def test_fsdp_meta_start_up_gives_the_ddp_weights(tmp_path, free_port):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, kw in (("tiny", TINY), ("m3ae", M3AE)):
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        ref = plain(kw)
        n_params = sum(p.numel() for p in ref.parameters())
        assert saved["local"] < 0.6 * n_params  # rank 0 holds about half of the parameters
        ref_sd = ref.state_dict()
        assert sorted(saved["sd"]) == sorted(ref_sd)
        for k, v in ref_sd.items():
            assert torch.equal(saved["sd"][k], v), (name, k)
