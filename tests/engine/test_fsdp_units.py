"""The FSDP units of ``train.parallel=fsdp`` (multimae.engine.parallel.prepare_model): besides every
transformer block, each input and output adapter (or the shared decoder) with parameters outside
its blocks is a unit of its own, so the root unit keeps only what belongs to no adapter."""
from __future__ import annotations

import pytest
import torch

from multimae.engine import parallel as P
from multimae.model.multimae import ModelConfig, MultiMAE

TINY = dict(preset="nano", depth=2, image_size=32, patch_size=8, modalities={"semseg": {"num_classes": 5}})
M3AE = dict(preset="nano", depth=2, image_size=32, patch_size=8, inputs=["rgb", "caption"], outputs=["rgb", "caption"],
            decoder="shared", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            modalities={"caption": {"max_len": 8, "num_classes": 50}})


@pytest.mark.parametrize("kw", [TINY, M3AE], ids=["per-task-decoders", "shared-decoder"])
def test_every_adapter_is_a_unit_and_the_root_keeps_little(kw: dict) -> None:
    torch.manual_seed(0)
    model = MultiMAE(ModelConfig(**kw))
    units = P._adapters(model)
    expected = list(model.input_adapters.values()) + (
        [model.shared_decoder] if kw.get("decoder") == "shared" else list(model.output_adapters.values()))
    assert [id(u) for u in units] == [id(u) for u in expected]
    in_units = {id(p) for m in [*units, *P.transformer_blocks(model)] for p in m.parameters()}
    root = {n for n, p in model.named_parameters() if id(p) not in in_units}
    assert root == {"global_tokens"}, root
