"""The structure the fs code keeps, checked statically: only ``fs/namespace.py`` writes a node's
fields (import cycles: tests/test_import_cycles.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from privifs.fs.namespace import Node

PACKAGE = Path(__file__).resolve().parent.parent / "privifs"
NODE_FIELDS = set(Node.__slots__)


def _root_name(expr: ast.expr) -> str | None:
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def _targets(node: ast.AST):
    if isinstance(node, ast.Assign):
        for t in node.targets:
            yield from _flatten(t)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        yield from _flatten(node.target)
    elif isinstance(node, ast.Delete):
        for t in node.targets:
            yield from _flatten(t)


def _flatten(target: ast.expr):
    if isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from _flatten(t)
    else:
        yield target


def node_field_writes(source: str, filename: str) -> list[str]:
    """Assignments in ``source`` to a field a Node has, on anything but ``self`` (a class's own
    attribute of the same name, like ``self.size``), and every ``setattr`` call."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        for target in _targets(node):
            if isinstance(target, ast.Attribute) and target.attr in NODE_FIELDS and _root_name(target.value) != "self":
                found.append(f"{filename}:{target.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_namespace_writes_node_fields():
    writes = []
    for path in sorted((PACKAGE / "fs").glob("*.py")):
        if path.name != "namespace.py":
            writes += node_field_writes(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert writes == [], "node fields written outside fs/namespace.py:\n" + "\n".join(writes)


def test_the_node_field_check_sees_each_way_of_writing():
    source = (
        "node.staged = None\nn.lookups += 1\nparent.mtime_ns = parent.ctime_ns = 1\n"
        "a, fh.node.size = 1, 2\nsetattr(node, 'mode', 1)\nself.size = 0\n"
    )
    assert len(node_field_writes(source, "x.py")) == 6
