"""The package's import graph, read from its source (no services): no cycles, and beat's code and the
worker's code never import each other, directly or through another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "celery_scheduller"
#: beat's side: the loop, its shell, its planning, its callback threads, its LISTEN connection
BEAT = {"engine", "sender", "schedulers", "planning", "callbacks", "listener"}
#: the worker's side: the task hooks and the prefetch fix
WORKER = {"hooks", "prefetch"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import the module runs, at the top or in a function; not those under ``if TYPE_CHECKING``."""
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def graph() -> dict[str, set[str]]:
    """Module → the package modules it imports ("" is the package itself)."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = ".".join(part for part in (base, node.module or "") if part)
                for alias in node.names:
                    candidate = f"{module}.{alias.name}" if module else alias.name
                    targets.add(candidate if candidate in modules else module)
            else:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for full in names:
                    if full == "celery_scheduller" or full.startswith("celery_scheduller."):
                        targets.add(full.removeprefix("celery_scheduller").removeprefix("."))
        edges[name] = {target for target in targets if target in modules and target != name}
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_is_read():
    edges = graph()
    assert "store.transitions" in edges["store.postgres"]
    assert "wire" in edges["engine"]
    assert "responses" in edges["hooks"]


def test_no_import_cycles():
    edges = graph()
    cycles = sorted(name for name in edges if name in _reachable(edges, name))
    assert cycles == []


def test_beat_and_worker_code_do_not_import_each_other():
    edges = graph()
    assert set(edges) >= BEAT and set(edges) >= WORKER
    for module in BEAT:
        assert _reachable(edges, module) & WORKER == set(), module
    for module in WORKER:
        assert _reachable(edges, module) & BEAT == set(), module
