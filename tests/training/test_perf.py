import subprocess
import sys
import textwrap

import pytest
import torch

from multimae.layers.attention import attention_mode, set_attention_mode, _attend, _use_fused

FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from multimae.perf import tune_malloc
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
    prev = attention_mode()
    try:
        outs = {}
        for mode in ("fused", "manual"):
            set_attention_mode(mode)
            outs[mode] = _attend(q, k, v, pad).float()
        set_attention_mode("auto")
        assert _use_fused(q) == (dtype == torch.float32)  # explicit form for CPU bf16
    finally:
        set_attention_mode(prev)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs["fused"], outs["manual"], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="attention mode 'flash'"):
        set_attention_mode("flash")
