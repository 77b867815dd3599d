"""The package's import graph: no circles, and every import points down the rank table of the layers
(core < data, checkpoint < model < runs, evaluation < engine < tasks < apps < cli)."""
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


def test_loader_import_pulls_in_no_training_or_viz() -> None:
    """(The package root imports the model for ``from multimae import MultiMAE``; the loader adds
    nothing from training/ or viz on top.)"""
    code = ("import sys, multimae; before = set(sys.modules); import multimae.data.loader; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith(('multimae.engine', 'multimae.tasks', "
            "'multimae.evaluation.viz', 'multimae.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# The layers, bottom to top. A module's rank is that of the longest prefix naming it; an import must
# point to a strictly lower rank, or stay inside its own entry (data may import data). Two entries of
# one rank are peers and never import each other (data and checkpoint know nothing of one another).
RANKS: dict[str, int] = {
    "multimae.core": 0,            # batch, modalities, masking, seeding, configs, io, device policy
    "multimae.model.layers": 1,    # pure blocks
    "multimae.model.presets": 1,
    "multimae.model.config": 2,    # ModelConfig (the checkpoint layer reads it)
    "multimae.data": 3,
    "multimae.checkpoint": 3,
    "multimae.model": 4,           # the encoder, MultiMAE, adapters, decoders, heads, transfer model
    "multimae.runs": 5,            # load_run: the one way to open a run
    "multimae.evaluation": 5,      # metrics, protocols, figures
    "multimae.engine": 6,
    "multimae.tasks": 7,
    "multimae.apps": 8,            # predict, tiled, export, demo, pseudolabel, the inference pipeline
    "multimae.cli": 9,
}


def entry(module: str) -> str | None:
    """The RANKS key that names ``module`` (its longest prefix), or None for the package root."""
    keys = [k for k in RANKS if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        src = entry(mod)
        if src is None:
            continue
        for dep in deps:
            dst = entry(dep)
            if dst is None or dst == src:
                continue
            if RANKS[dst] >= RANKS[src]:
                bad.append(f"{mod} (rank {RANKS[src]}) imports {dep} (rank {RANKS[dst]})")
    return sorted(bad)


def test_every_module_has_a_rank() -> None:
    unranked = sorted(m for m in import_graph() if m != "multimae" and entry(m) is None)
    assert not unranked, f"modules outside the rank table (add them to RANKS): {unranked}"


def test_every_import_points_down_the_rank_table() -> None:
    bad = layering_violations(import_graph())
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_rank_check_catches_upward_and_sideways_imports() -> None:
    g = {"multimae.data.folder": {"multimae.checkpoint.io"},            # peers
         "multimae.model.layers.mlp": {"multimae.model.multimae"},     # up, inside one folder
         "multimae.tasks.pretrain": {"multimae.data.loader", "multimae.tasks.pretrain_config"}}  # fine
    assert layering_violations(g) == [
        "multimae.data.folder (rank 3) imports multimae.checkpoint.io (rank 3)",
        "multimae.model.layers.mlp (rank 1) imports multimae.model.multimae (rank 4)"]
