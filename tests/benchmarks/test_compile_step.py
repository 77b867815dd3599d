"""``benchmarks/compile_step.py --quick`` runs the compiled-vs-eager comparison end to end (nano,
dynamo only) and writes its table: one graph per workload (fullgraph, no recompile), no host sync in
the eager step, equal first-step losses. It checks that the benchmark works, not the speed-up."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_step.py"


def test_quick_mode_writes_the_table(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    out = tmp_path / "compile_step.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.read_text().splitlines() if line.startswith("| "))}
    for name in ("pretrain", "semseg"):
        cells = rows[name]
        eager, compiled, _, _, graphs, syncs, losses = cells[1:8]
        assert float(eager) > 0 and float(compiled) > 0
        assert graphs == "1" and syncs == "0", cells
        a, b = (float(x) for x in losses.split(" / "))
        assert abs(a - b) <= 1e-3 * abs(a), cells
