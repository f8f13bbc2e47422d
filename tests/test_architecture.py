"""The layout the architecture asks for: imports run one way (no cycle among the project's modules,
whether the import is at module level or inside a function), and webapp/ keeps its plumbing small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("webapp", "worker", "ml")
MAX_WEBAPP_TOP_LEVEL_MODULES = 14


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports anywhere in its file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # A package's modules may import their own package's __init__ (re-exports) freely.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_among_the_projects_modules():
    assert import_cycles(project_modules()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "__init__.py").write_text("")
    (tmp_path / "webapp" / "a.py").write_text("from . import b\n")
    (tmp_path / "webapp" / "b.py").write_text("def f():\n    from .a import x\n")
    for package in ("worker", "ml"):
        (tmp_path / package).mkdir()
    assert import_cycles(project_modules(tmp_path)) == [["webapp.a", "webapp.b"]]


def test_webapp_keeps_at_most_14_top_level_modules_beside_its_capability_packages():
    top_level = sorted(p.name for p in (ROOT / "webapp").glob("*.py"))
    assert len(top_level) <= MAX_WEBAPP_TOP_LEVEL_MODULES, top_level
    packages = sorted(p.parent.name for p in (ROOT / "webapp").glob("*/__init__.py"))
    capabilities = [
        "accounts", "api", "auth", "backup", "batches", "cases", "dashboard", "model_versions", "review", "similar",
    ]  # fmt: skip
    assert packages == capabilities
