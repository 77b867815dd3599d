import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global RNG state, so no result depends on test order."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
