"""The package's shape (issue 20): its import graph, function-local imports included, has no cycle, and the training
entry point reaches none of the code that launches trials (launchers, the sweep callback, SLURM, the stacked fit)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# what only a launch knows: a trial must run the same whoever starts it
LAUNCH = ("hydra_plugins", "mnistlab.launching", "mnistlab.sweep", "mnistlab.cluster", "mnistlab.stacked")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (top-level or inside functions)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(o for o in map(owner, names) if o)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_training_entry_reaches_no_launch_code():
    graph = import_graph()
    reached = reachable(graph, "mnistlab.train")
    assert "mnistlab.model" in reached and "mnistlab.tracking.trial" in reached  # the graph sees the real imports
    assert sorted(m for m in reached if m.startswith(LAUNCH)) == []


def test_the_checks_see_a_cycle_and_a_launch_import():
    """Both checks can fail: a made-up graph with a cycle through train and an edge into the sweep callback."""
    graph = {"mnistlab.train": {"mnistlab.sweep"}, "mnistlab.sweep": {"mnistlab.report", "mnistlab.train"},
             "mnistlab.report": set()}
    assert cycles(graph) == [["mnistlab.sweep", "mnistlab.train"]]
    assert "mnistlab.sweep" in reachable(graph, "mnistlab.train")
