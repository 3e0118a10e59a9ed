"""No import cycles between privifs modules.

Every module under ``privifs/`` is parsed (its ``import`` statements, wherever they stand: a late
import inside a function or one under ``if TYPE_CHECKING:`` still ties the two modules' designs
together) into a graph of module -> privifs modules it imports;
a strongly connected component of two or more modules (or a module importing itself) is a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "privifs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[tuple[str, ...]]:
    """What ``tree`` imports, as alternatives for each name, most precise first: ``from a import b``
    is module ``a.b`` if there is one, else ``a`` (which defines ``b``)."""
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((a.name,) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            found.update((f"{base}.{a.name}", base) for a in node.names)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the privifs modules it imports."""
    files = {module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for alternatives in _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py"):
            target = next((n for n in alternatives if n in files), None)
            if target is not None and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_the_cycle_finder_finds_a_circle_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_relative_late_and_type_checking_imports_all_count():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from privifs.x import Y\n"
        "from . import z\nfrom .w import v\ndef f():\n    import privifs.late\n"
    )
    found = _imports(tree, "privifs.pkg.mod", False)
    assert {
        ("privifs.x.Y", "privifs.x"),
        ("privifs.pkg.z", "privifs.pkg"),
        ("privifs.pkg.w.v", "privifs.pkg.w"),
        ("privifs.late",),
    } <= found


def test_the_graph_sees_the_real_engine_imports():
    graph = import_graph()
    assert "privifs.engine.storage" in graph["privifs.engine.core"]
    assert "privifs.engine.core" in graph["privifs.engine.routes_device"]


def test_no_import_cycle_anywhere_in_privifs():
    found = cycles(import_graph())
    assert found == [], "modules of privifs that import each other: " + "; ".join(" <-> ".join(c) for c in found)
