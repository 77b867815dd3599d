"""``multimae --help`` and argument errors are answered before the library is imported: no torch,
timm, numpy or model module is loaded (what made ``--help`` take seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("torch", "timm", "numpy", "PIL", "multimae.model", "multimae.core.masking", "multimae.runs")

# run the console entry point as ``python -m multimae.cli.main ARGS`` would, then list what it imported
WRAPPER = """
import json, runpy, sys
sys.argv = ["multimae", *json.loads(sys.argv[1])]
try:
    runpy.run_module("multimae.cli.main", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _run(*args: str) -> tuple[int, list[str], str]:
    out = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(list(args))], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=120)
    res = json.loads(out.stderr.strip().splitlines()[-1])
    return res["code"], res["modules"], out.stdout + out.stderr


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["finetune", "--help"], ["data", "prepare", "--help"],
                                  ["predict"], ["pretrain", "--no-such-flag"], ["no-such-command"]])
def test_help_and_argument_errors_import_no_torch(args: list[str]) -> None:
    code, modules, text = _run(*args)
    assert code in (0, 2), text
    heavy = [m for m in modules if m.startswith(HEAVY)]
    assert not heavy, f"multimae {' '.join(args)} imported {heavy[:8]}"
    if args == ["--help"]:
        assert "predict" in text and "finetune" in text


def test_the_wrapper_sees_a_heavy_import() -> None:
    """The check itself: a command that runs imports torch, and the wrapper reports it."""
    code, modules, text = _run("convert", "/no/such/file.pth", "/tmp/x")
    assert "torch" in modules, text
