"""``benchmarks/reproduce.py --quick`` runs every stage (pretraining of each arm, every transfer
task, the report and the figure) for a couple of steps and writes the results table. It asserts
that the pipeline runs and the table has every arm and task, not what the numbers are."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


def test_reproduce_quick_writes_the_table(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "rq"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "reproduce.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| arm | semseg RGB mIoU")]
    assert table, md[:2000]
    for col in ("semseg RGB mIoU", "semseg D mIoU", "semseg RGB-D mIoU", "depth δ1", "depth AbsRel",
                "cls top-1 (FT)", "probe top-1", "OOD AUROC (MSP)"):
        assert col in table[0], col
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for arm in ("MultiMAE", "MAE", "M3AE", "scratch"):
        assert arm in rows, arm
        assert " - |" not in rows[arm], f"{arm} has a missing cell: {rows[arm]}"
    assert "## Claims" in md and "C5" in md
    assert (out / "reproduce.png").stat().st_size > 0
    data = json.loads((out / "reproduce.json").read_text())
    assert data["quick"] is True and set(data["stats"]) == {"multimae", "mae", "m3ae", "scratch"}
    # the quick run never touches the committed results
    assert "--quick" in data["command"]
