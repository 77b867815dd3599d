import os
import socket
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
# shared helpers (tiny models, data, weights, step set-ups, fine-tuning trees): `from data_testutils import ...`
if str(REPO / "tests" / "helpers") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
FIXTURES = REPO / "tests" / "fixtures"
GOLDEN = FIXTURES / "multimae-official-compact.safetensors"
OFFICIAL_TSV = FIXTURES / "multimae-official-state-dict.tsv"


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.is_file():
        pytest.fail(f"golden file {GOLDEN} not found (it is part of the repository: tests/fixtures)")
    from safetensors.torch import load_file

    return load_file(str(GOLDEN))


@pytest.fixture(scope="session")
def official_tsv():
    if not OFFICIAL_TSV.is_file():
        pytest.fail(f"{OFFICIAL_TSV} not found (it is part of the repository: tests/fixtures)")
    return OFFICIAL_TSV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a free loopback TCP port (for a gloo rendezvous or ``torchrun``)."""
    return _free_port


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global RNG state, so no result depends on test order."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_model():
    """A fresh MultiMAE of the shared tiny config (tests/helpers/tiny.py: dim 32, depth 2, 2 heads,
    8-px patches, 32-px images), in eval mode, its weights drawn from the seeded RNG."""
    from tiny import tiny_model as build

    return build().eval()
