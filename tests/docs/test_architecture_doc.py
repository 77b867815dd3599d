"""docs/architecture.md matches the code: every module it names exists, and every module of the
engine and the tasks is named there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "multimae"
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_every_named_module_exists():
    missing = []
    for path in sorted(set(re.findall(r"(?<![*\w/])((?:[a-z_]+/)*[a-z_]+\.py)\b", DOC))):
        if path.startswith("tests/"):
            assert (ROOT / path).is_file(), path
            continue
        hits = list(PKG.rglob(path.split("/")[-1]))
        if not any(str(h).endswith(path) for h in hits):
            missing.append(path)
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_engine_and_tasks_modules_are_all_named():
    unnamed = [f"{d}/{f.name}" for d in ("engine", "tasks") for f in sorted((PKG / d).glob("*.py"))
               if f.name != "__init__.py" and f.name not in DOC
               and not any(re.fullmatch(p.replace("*", ".*"), f.name) for p in re.findall(r"\*[a-z_]*\.py", DOC))]
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"
