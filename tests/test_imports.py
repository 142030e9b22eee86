"""The package read from its source (ast, nothing imported): no module imports itself back through others
(imports inside functions count too: a late import hides a cycle, it does not remove it), and no function runs
over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "nanodit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body (``from a import b`` names a.b when
    that is a module, else a)."""
    here = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: a relative import (the package imports absolutely)"
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules and n != here}
    return out


def graph() -> dict[str, set[str]]:
    paths = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_scan_sees_imports_and_finds_a_planted_cycle():
    g = graph()
    assert "nanodit.checkpoint" in g["nanodit.dist_checkpoint"]  # a module-level import
    assert len(g) > 40
    planted = {**g, "nanodit.checkpoint": g["nanodit.checkpoint"] | {"nanodit.dist_checkpoint"}}
    assert any({"nanodit.checkpoint", "nanodit.dist_checkpoint"} <= set(c) for c in cycles(planted))


def test_no_module_of_the_package_imports_itself_back():
    found = cycles(graph())
    assert not found, f"import cycles (late imports included): {found}"


def test_no_function_of_the_package_runs_over_60_lines():
    """The house rule (a function reads on one screen): every function and method of ``nanodit/``, docstring
    included, is at most 60 lines."""
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
