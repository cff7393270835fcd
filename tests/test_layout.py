"""The rooms keep their walls: no import cycle inside a package (function-local imports count), the library imports no
Ray, Serve app or pipeline, and the ingress module holds the native routes only."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    """Modules a file imports, function-local imports included (they can cycle at call time):
    ``from a.b import c`` counts as ``a.b.c`` when that is a module, else as ``a.b``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _graph(package: str) -> Dict[str, Set[str]]:
    """``from a.b import c`` counts ``a.b`` (its ``__init__`` runs) and ``a.b.c`` when c is a module."""
    paths = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in paths and m != name} for name, path in paths.items()}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, str] = {}

    def walk(module: str, path: List[str]) -> List[str]:
        if state.get(module) == "open":
            return path[path.index(module):] + [module]
        if state.get(module) == "done":
            return []
        state[module] = "open"
        for imported in sorted(graph[module]):
            found = walk(imported, path + [module])
            if found:
                return found
        state[module] = "done"
        return []

    for module in sorted(graph):
        found = walk(module, [])
        if found:
            return found
    return []


@pytest.mark.parametrize("package", ["acestep", "serve", "pipelines", "bench"])
def test_no_import_cycle(package):
    graph = _graph(package)
    assert len(graph) > 3
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_library_imports_no_ray_serve_or_pipelines():
    for path in (ROOT / "acestep").rglob("*.py"):
        if path.name == "cli.py":  # its Ray subcommands import serve/pipelines inside the command
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in {"ray", "serve", "pipelines", "fastapi"}, f"{path.name}: {name}"


def test_the_ingress_module_holds_the_native_routes_only():
    assert len((ROOT / "serve" / "api.py").read_text().splitlines()) < 300
