"""The README's Python example runs as written (at a small size)."""
import re
from pathlib import Path

import torch


def test_readme_python_example_runs(monkeypatch, tmp_path):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('preset="base"', 'preset="nano"').replace("224", "64").replace("56, 56", "16, 16")
    code = code.replace("num_visible=98", "num_visible=12")
    head, official = code.split("# official MultiMAE weights")
    ns: dict = {}
    exec(head, ns)
    assert ns["out"].preds["semseg"].shape == (2, 133, 16, 16)
    assert ns["preds"]["depth"].shape == (2, 1, 64, 64)
    # the official-weights line: save this model's weights in the official layout and load them back
    path = tmp_path / "multimae-b_98_rgb+-depth-semseg_1600e.pth"
    torch.save({"model": ns["model"].state_dict()}, path)
    monkeypatch.chdir(tmp_path)
    # nano's width (128) is no standard ViT's: its head count must be given (README: never guessed)
    official = official.replace('1600e.pth")', '1600e.pth", num_heads=4)')
    assert "num_heads=4" in official
    exec("#" + official, ns)
    assert ns["model"].config.dim == 128
