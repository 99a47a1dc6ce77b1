"""The package's shape (issue 11): data flows one way, and only the entry point knows the app.

Read from the source with ``ast``, never by importing it:

* no ``import`` inside a function body: a lazy import that dodges a cycle hides it;
* no cycle in the module graph, counting imports under ``if TYPE_CHECKING:``, which are a
  dependency of the code's meaning even when not of its start-up;
* ``gateway.app`` (the composition root) is imported only by the entry point that serves it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
# The entry points that may build the app; every other module is handed what it needs.
ENTRY_POINTS = frozenset({"gateway.cli", "gateway.serve"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _target(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str) -> set[str]:
    """The gateway modules ``module`` imports, anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            # "from gateway.store import sqlite" names a module; "... import Store" a name in one.
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # "import gateway.store.base as b" and the like
                name = name.rpartition(".")[0]
            if name.startswith("gateway") and name != module and name != "gateway":
                found.add(name)
    return found


def function_level_imports(module: str) -> list[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    found.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_package() -> None:
    assert {"gateway.app", "gateway.decision", "gateway.enrol", "gateway.store.base"} <= set(MODULES)
    assert "gateway.decision" in imports("gateway.app")
    assert "gateway.store.base" in imports("gateway.store.sqlite")


def test_the_cycle_finder_finds_cycles() -> None:
    # The test must be able to fail: a graph with a cycle through three modules and a self-free tail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_a_function(module: str) -> None:
    assert function_level_imports(module) == []


def test_the_module_graph_has_no_cycle() -> None:
    graph = {module: imports(module) for module in MODULES}
    assert cycles(graph) == []


def test_only_the_entry_point_imports_the_app() -> None:
    importers = sorted(m for m in MODULES if "gateway.app" in imports(m))
    assert set(importers) <= ENTRY_POINTS, importers
