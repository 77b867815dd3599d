"""The package's import graph: no circles, and the data layer never reaches into the engine, the tasks, viz
or the model (data flows one way: source -> transform -> collate + plan -> model -> step)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# none left: any circle found fails the test (an entry here would whitelist one)
KNOWN_CYCLES: list[set[str]] = []


def import_graph() -> dict[str, set[str]]:
    """module -> multimae modules it imports anywhere (top level or inside functions)."""
    files = {}
    for f in (SRC / "multimae").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in files.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.startswith("multimae")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.startswith("multimae"):
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else owner(base) for a in node.names}
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_lazy_imports() -> None:
    g = import_graph()
    assert "multimae.data.loader" in g["multimae.tasks.pretrain"]
    assert "multimae.data.synthetic" in g["multimae.data.loader"]  # imported inside a function


def test_no_import_circles() -> None:
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import circles: {new}"


def test_a_new_circle_is_found() -> None:
    """The circle finder itself: a lazy import back up (as ``MultiMAE.from_pretrained`` <->
    ``checkpoint.pretrained`` once was) is a circle, a chain is not."""
    g = {"m.model": {"m.checkpoint.pretrained"}, "m.checkpoint.pretrained": {"m.checkpoint.convert"},
         "m.checkpoint.convert": set(), "m.x": {"m.model"}}
    assert cycles(g) == []
    g["m.checkpoint.convert"] = {"m.model"}
    assert cycles(g) == [{"m.model", "m.checkpoint.pretrained", "m.checkpoint.convert"}]


def test_checkpoint_layer_sits_below_the_model() -> None:
    """checkpoint/ reads and converts weights and configs; it never imports the model (nor anything
    above it), not even inside a function: the model calls down into it."""
    banned = ("multimae.model.multimae", "multimae.model.transfer", "multimae.model.heads", "multimae.model.adapters",
              "multimae.cli", "multimae.apps.viz", "multimae.evaluation", "multimae.apps.predict", "multimae.apps.export",
              "multimae.engine", "multimae.tasks")
    bad = {m: sorted(d for d in deps if d.startswith(banned) and d != "multimae.model.config")
           for m, deps in import_graph().items() if m.startswith("multimae.checkpoint")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_model_and_transfer_do_not_reach_into_the_engine_or_tasks() -> None:
    """The model layer (model, layers, adapters, heads, checkpoint, transfer) is below the engine and
    the tasks: they import it, never the other way round."""
    low = ("multimae.model.multimae", "multimae.model.layers", "multimae.model.adapters", "multimae.model.heads", "multimae.checkpoint",
           "multimae.model.transfer")
    bad = {m: sorted(d for d in deps if d.startswith(("multimae.engine", "multimae.tasks", "multimae.cli")))
           for m, deps in import_graph().items() if m.startswith(low)}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_data_layer_depends_only_downward() -> None:
    banned = ("multimae.engine", "multimae.tasks", "multimae.apps.viz", "multimae.model.multimae", "multimae.model.adapters", "multimae.model.layers",
              "multimae.evaluation", "multimae.cli")
    bad = {m: sorted(d for d in deps if d.startswith(banned))
           for m, deps in import_graph().items() if m.startswith("multimae.data")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_loader_import_pulls_in_no_training_or_viz() -> None:
    """(The package root imports the model for ``from multimae import MultiMAE``; the loader adds
    nothing from training/ or viz on top.)"""
    code = ("import sys, multimae; before = set(sys.modules); import multimae.data.loader; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith(('multimae.engine', 'multimae.tasks', "
            "'multimae.apps.viz', 'multimae.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_runs_sit_below_the_engine_and_the_apps_on_runs() -> None:
    """``runs.py`` (load_run) imports neither the engine nor the tasks; the apps open runs through it
    and import no task module; ``core/`` imports nothing above it."""
    g = import_graph()
    assert not [d for d in g["multimae.runs"] if d.startswith(("multimae.engine", "multimae.tasks", "multimae.apps"))]
    bad = {m: sorted(d for d in deps if d.startswith("multimae.tasks"))
           for m, deps in g.items() if m.startswith("multimae.apps")}
    assert not {m: d for m, d in bad.items() if d}, bad
    core = {m: sorted(d for d in deps if not d.startswith("multimae.core"))
            for m, deps in g.items() if m.startswith("multimae.core")}
    assert not {m: d for m, d in core.items() if d}, core
