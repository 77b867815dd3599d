"""The README's transfer example runs as written (against a small pretraining run)."""
import re
from pathlib import Path

import torch

from multimae.checkpoint import save_checkpoint
from multimae.config import to_dict
from multimae.model import ModelConfig, MultiMAE


def test_readme_transfer_example_runs(monkeypatch, tmp_path):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Transfer models (Python)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cfg = ModelConfig(preset="nano", dim=32, depth=2, num_heads=2, image_size=32, inputs=["rgb", "depth"],
                      outputs=["rgb", "depth"], decoder_dim=16, decoder_depth=1, decoder_heads=2)
    save_checkpoint(tmp_path / "runs" / "synthetic-tiny", 1, MultiMAE(cfg).state_dict(), {},
                    {"config": {"model": to_dict(cfg)}, "epoch": 0})
    monkeypatch.chdir(tmp_path)
    ns = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    exec(code, ns)
    assert ns["logits"].shape == (2, 6, 32, 32)
    assert ns["report"].missing and all(k.startswith("head.") for k in ns["report"].missing)
