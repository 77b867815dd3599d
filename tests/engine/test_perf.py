import subprocess
import sys
import textwrap

import pytest
import torch

from multimae.model.layers.attention import attend, set_attention, use_fused

FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from multimae.core.perf import tune_malloc
    applied = tune_malloc() if sys.argv[1] == "tuned" else False
    def step():  # a training step's pattern: several short-lived 9 MB tensors per round
        a = torch.ones(2_400_000); b = a * 2; c = b + a; return float(c[0])
    for _ in range(3):
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_stops_page_faults_on_reused_memory() -> None:
    res = subprocess.run([sys.executable, "-c", FAULTS, "tuned"], capture_output=True, text=True, check=True)
    applied, faults = res.stdout.split()
    assert applied == "True"
    # fresh memory for every tensor would fault 20 rounds x 3 tensors x ~2,300 pages = ~140k times
    # (glibc's default mmap-s 9 MB blocks and often does); reused heap memory faults rarely
    assert int(faults) < 20_000, faults


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_modes_agree(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g).to(dtype) for _ in range(3))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    outs = {mode: attend(q, k, v, pad, mode).float() for mode in ("fused", "manual")}
    assert use_fused(q, "auto") == (dtype == torch.float32)  # explicit form for CPU bf16
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs["fused"], outs["manual"], atol=tol, rtol=tol)


def test_attention_kernel_is_chosen_by_the_model_config() -> None:
    """No process-wide switch: two models in one process keep their own kernels."""
    from multimae.model.layers.attention import Attention, CrossAttention
    from multimae.model.multimae import ModelConfig, MultiMAE

    def modes(model: torch.nn.Module) -> set[str]:
        return {m.mode for m in model.modules() if isinstance(m, (Attention, CrossAttention))}

    cfg = dict(preset="nano", depth=1, image_size=32, patch_size=8, decoder_depth=1)
    manual, auto = MultiMAE(ModelConfig(attention="manual", **cfg)), MultiMAE(ModelConfig(**cfg))
    assert modes(manual) == {"manual"} and modes(auto) == {"auto"}
    assert modes(set_attention(auto, "fused")) == {"fused"} and modes(manual) == {"manual"}
    with pytest.raises(ValueError, match="attention mode 'flash'"):
        MultiMAE(ModelConfig(attention="flash", **cfg))
