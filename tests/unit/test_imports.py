"""No import circles inside the ``halb`` package.

Every module of the package is read with ``ast`` (nothing is imported): its ``import`` and
``from ... import`` statements at any depth (module level and inside functions, relative and
absolute) give the edges of a module graph; the bodies of ``if TYPE_CHECKING:`` blocks are left
out (they never run) and so are the generated ``halb/v1/*_pb2*`` files. An edge goes to the
most specific module named: ``from .proxy import tcp`` is an edge to ``halb.proxy.tcp`` when
that module exists, else (a name defined in the package) to ``halb.proxy``.

A circle means the parts are not built from the root down: the test fails naming each circle,
module by module, with the file and line of every import along it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = "halb"
PKG_DIR = Path(__file__).resolve().parents[2] / PKG


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_generated(path: Path) -> bool:
    return path.parent.name == "v1" and path.parent.parent == PKG_DIR and "_pb2" in path.name


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package but the generated ones."""
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py")) if not _is_generated(p)}


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in the tree, except in ``if TYPE_CHECKING:`` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (``from ..a import b`` in ``halb.x.y``)."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        out: dict[str, int] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    # ``import a.b.c`` binds ``a`` but runs ``a.b.c``: the most specific module
                    parts = alias.name.split(".")
                    while parts and ".".join(parts) not in modules:
                        parts.pop()
                    if parts:
                        targets.append(".".join(parts))
            else:
                base = _resolve(name, is_pkg, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    elif base in modules:
                        targets.append(base)
            for t in targets:
                if t != name and (t == PKG or t.startswith(PKG + ".")):
                    out[t] = min(out.get(t, node.lineno), node.lineno)
        edges[name] = out
    return edges


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the groups of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def one_cycle(group: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest circle through the group's first module (breadth-first, inside the group)."""
    start, members = group[0], set(group)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return group + [group[0]]  # (not reached: a strongly connected group has a circle)


def describe(cycle: list[str], edges: dict[str, dict[str, int]],
             modules: dict[str, Path]) -> str:
    root = PKG_DIR.parent
    steps = [f"    {a} -> {b}   ({modules[a].relative_to(root)}:{edges[a][b]})"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_the_graph_is_read():
    """The reader sees the imports it must (a broken reader would find no circle at all)."""
    modules = package_modules()
    assert "halb.node" in modules and "halb.proxy" in modules
    assert not any(_is_generated(p) for p in modules.values())
    edges = import_edges(modules)
    assert "halb.config" in edges["halb.node"]  # module level, relative
    assert "halb.health" in edges["halb.node"]  # inside a function
    assert "halb.log" in edges["halb.node"]  # ``from . import log``: the submodule


def test_resolution_of_relative_and_type_checking_imports(tmp_path):
    src = ("from typing import TYPE_CHECKING\n"
           "import halb.a.b\n"
           "from . import c\n"
           "from .. import x, y\n"
           "if TYPE_CHECKING:\n"
           "    from .d import D\n"
           "else:\n"
           "    from .e import E\n"
           "def f():\n"
           "    from ..a import b\n")
    path = tmp_path / "m.py"
    path.write_text(src)
    modules = {"halb": tmp_path / "__init__.py", "halb.a": tmp_path / "a.py",
               "halb.a.b": tmp_path / "b.py", "halb.p.c": tmp_path / "c.py",
               "halb.p.d": tmp_path / "d.py", "halb.p.e": tmp_path / "e.py",
               "halb.x": tmp_path / "x.py", "halb.p.m": path}
    for p in modules.values():
        if not p.exists():
            p.write_text("")
    got = import_edges(modules)["halb.p.m"]
    assert set(got) == {"halb.a.b", "halb.p.c", "halb.x", "halb", "halb.p.e"}
    assert got["halb.a.b"] == 2 and got["halb.p.e"] == 8


def test_cycle_finder():
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    groups = strongly_connected(edges)
    assert groups == [["a", "b", "c"]]
    assert one_cycle(groups[0], edges) == ["a", "b", "c", "a"]


def test_no_import_circles():
    modules = package_modules()
    edges = import_edges(modules)
    groups = strongly_connected(edges)
    if groups:
        text = "\n\n".join(describe(one_cycle(g, edges), edges, modules)
                           + (f"\n    (all modules of this circle: {', '.join(g)})"
                              if len(g) > len(one_cycle(g, edges)) - 1 else "")
                           for g in groups)
        pytest.fail(f"{len(groups)} import circle(s) in the {PKG} package:\n{text}",
                    pytrace=False)
