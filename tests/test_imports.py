"""Imports point one way (DESIGN.md): no module of cl_runner imports one that imports it back, and tracking/
imports nothing of the engine, the methods, the report or the launcher. Read statically (ast) from the
source, function-level imports included, so a cycle hidden in a lazy import is found too."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cl_runner"


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the cl_runner modules it imports, anywhere in its body."""
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = m.split(".") if is_pkg else m.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # cl_runner.tracking.names.acc -> cl_runner.tracking.names
                    t = t.rpartition(".")[0]
                # a package and its own submodules (registry loading, `from . import METHODS`) are one unit
                if t and t != m and not t.startswith(m + ".") and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges = imports(modules())
    assert len(edges) > 20 and "cl_runner.tracking.sync" in edges  # the walk found the package
    assert cycles(edges) == []


def test_the_checker_finds_a_cycle_in_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_tracking_imports_only_itself_and_errors():
    edges = imports(modules())
    for m, targets in edges.items():
        if m.startswith("cl_runner.tracking"):
            outside = {t for t in targets if not t.startswith("cl_runner.tracking")} - {"cl_runner.errors"}
            assert not outside, f"{m} imports {sorted(outside)}"
