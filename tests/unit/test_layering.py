"""The layering README's Layout section states: each module imports only from lower layers or its own package,
and no modules import each other in a cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_upcycle"
LAYERS = [("errors",), ("activations", "report", "compat"), ("models",), ("data",), ("checkpoint",), ("recipe",),
          ("verify",), ("convert",), ("train", "eval"), ("demo",), ("cli",)]  # lowest first
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def import_graph() -> dict[str, set[str]]:
    """nemo_upcycle module -> the nemo_upcycle modules it imports."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("nemo_upcycle",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("nemo_upcycle")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nemo_upcycle"):
                assert not node.level, f"{path}: relative import"
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = deps - {name}
    assert len(graph) > 20, f"no package at {PACKAGE}"
    return graph


def test_every_module_imports_only_lower_layers():
    upward = []
    for module, deps in import_graph().items():
        if module == "nemo_upcycle":
            continue
        here = module.split(".")[1]
        assert here in RANK, f"{module} is in no layer: add it to README's Layout and LAYERS"
        upward += [f"{module} -> {d}" for d in deps
                   if d != "nemo_upcycle" and d.split(".")[1] != here and RANK[d.split(".")[1]] >= RANK[here]]
    assert not upward, upward


def test_no_import_cycle():
    graph, state = import_graph(), {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", " -> ".join(path + [node, dep])
            if dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
