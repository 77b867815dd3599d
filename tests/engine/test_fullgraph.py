"""``torch.compile(fullgraph=True)`` takes the pretraining and fine-tuning forward + loss whole (no
graph break: fullgraph raises on one), compiles once for a run's batches (the visible-token budget
is static), and the compiled outputs equal eager ones.

The default run traces with dynamo only (a counting backend that runs the captured graph: seconds);
the inductor variant generates C++ kernels (minutes on 2 cores) and is marked slow (``make test-all``).
"""
import pytest
import torch

from multimae.model.transfer import HeadConfig
from step_setups import finetune_micros, pretrain_micros  # tests/helpers is on sys.path (tests/conftest.py)

PRETRAIN = {
    "multimae": ("configs/pretrain/synthetic-tiny.yaml",),
    "m3ae": ("configs/pretrain/synthetic-m3ae-tiny.yaml", "model.modalities.caption.max_len=12", "model.decoder_dim=32"),
}
FINETUNE = {
    "cls": (HeadConfig(kind="classification", num_classes=4), "configs/finetune/synthetic-cls.yaml"),
    "semseg": (HeadConfig(kind="segmentation", num_classes=6, embed_dim=64), "configs/finetune/synthetic-semseg.yaml"),
    "depth": (HeadConfig(kind="depth", feature_dim=16), "configs/finetune/synthetic-depth.yaml"),
}


def _setup(name):
    if name in PRETRAIN:
        model, micros = pretrain_micros(*PRETRAIN[name])
        return model, micros
    head, config = FINETUNE[name]
    return finetune_micros(head.kind, head, config)


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo captures and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _loss_and_grads(model, micro):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # drop path draws the same in both
    out = model(*micro)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("name", [*PRETRAIN, *FINETUNE])
def test_forward_and_loss_compile_whole_once(name):
    model, micros = _setup(name)
    model.train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # raises on any graph break
    for micro in micros:
        got, got_grads = _loss_and_grads(compiled, micro)
        want, want_grads = _loss_and_grads(model, micro)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
        assert got_grads.keys() == want_grads.keys()
        for k in want_grads:
            assert torch.allclose(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6), k
    assert backend.graphs == 1  # one graph for every batch of the run: nothing recompiles


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multimae", "semseg"])
def test_inductor_fullgraph_equals_eager(name):
    model, micros = _setup(name)
    model.train()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    for micro in micros[:2]:
        got, got_grads = _loss_and_grads(compiled, micro)
        want, want_grads = _loss_and_grads(model, micro)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got, want)
        for k in want_grads:
            assert torch.allclose(got_grads[k], want_grads[k], rtol=1e-3, atol=1e-5), k
