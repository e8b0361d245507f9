"""Imports inside lowbit run one way: the module import graph of ``lowbit/`` has no cycle.

The graph is read from the source with ``ast`` (nothing is imported): one node per module (a package is its
``__init__``), one edge per ``import`` / ``from ... import`` of another lowbit module. ``from a.b import c``
points at ``a.b.c`` when that is a module, else at ``a.b``. Imports inside functions count as edges too: a
lazy import only postpones a circle to call time, and the layering this test guards ("convert -> algorithms
-> calibration -> quantizer -> formats") is about dependencies, not import timing. Imports under
``if TYPE_CHECKING:`` never run and are left out. The implicit import of a module's parent package is not an
edge (``lowbit/__init__`` imports the public API from every layer; counting it would make every module a
circle).
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowbit"


def module_names(package: Path) -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` file under ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return skipped


def imported_modules(name: str, path: Path, modules: set[str]) -> dict[str, int]:
    """{lowbit module that ``name`` imports: line of its first import} (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = _type_checking_nodes(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """{module: {imported lowbit module: line}} for every module under ``package``."""
    names = module_names(package)
    return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one module (Tarjan's
    algorithm, iterative), each the shortest way round from the component's first module by name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, {})))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """Breadth-first from the component's first module back to itself, inside the component."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if successor in component and successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """``a (line 3) -> b (line 9) -> a``: each step with the line of the import that makes it."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


def test_lowbit_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the package's imports
    cycles = [describe(graph, cycle) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles in lowbit/:\n" + "\n".join(cycles)


def package_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The module graph collapsed to ``lowbit``'s top-level packages and modules (``lowbit.calib.mse`` counts as
    ``lowbit.calib``); edges inside one package are dropped."""
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, dict[str, int]] = {top(name): {} for name in graph}
    for name, imported in graph.items():
        for target, line in imported.items():
            if top(target) != top(name):
                collapsed[top(name)].setdefault(top(target), line)
    return collapsed


def test_lowbit_packages_import_one_way():
    """Layers, not only modules: no package imports one that imports it back (calib -> quantizer -> calib ...)."""
    packages = package_graph(import_graph(PACKAGE))
    assert {"lowbit.calib", "lowbit.algorithms", "lowbit.formats"} <= packages.keys()
    cycles = [" -> ".join(cycle) for cycle in find_cycles(packages)]
    assert not cycles, "import cycles between lowbit's packages:\n" + "\n".join(cycles)
    assert package_graph({"p.a.x": {"p.b.y": 1}, "p.b.y": {"p.a.z": 2}, "p.a.z": {}}) == {
        "p.a": {"p.b": 1}, "p.b": {"p.a": 2}}


def test_the_known_layers_import_downwards():
    """Edges the structure rework removed stay removed (convert <-> algorithms, registry <-> attention)."""
    graph = import_graph(PACKAGE)
    assert "lowbit.algorithms.registry" in graph["lowbit.convert"]
    assert not [m for m in graph if m.startswith("lowbit.algorithms") and "lowbit.convert" in graph[m]]
    assert "lowbit.modules.attention" not in graph["lowbit.modules.registry"]
    assert "lowbit.modules.experts" not in graph["lowbit.modules.registry"]


def test_a_planted_cycle_is_found_and_named():
    graph = {"p.a": {"p.b": 3}, "p.b": {"p.c": 5}, "p.c": {"p.a": 7, "p.d": 8}, "p.d": {}, "p.e": {"p.d": 1}}
    cycles = find_cycles(graph)
    assert cycles == [["p.a", "p.b", "p.c", "p.a"]]
    assert describe(graph, cycles[0]) == "p.a (line 3) -> p.b (line 5) -> p.c (line 7) -> p.a"
    assert find_cycles({"p.a": {"p.b": 1}, "p.b": {}}) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_a_planted_cycle_in_files_is_found(tmp_path, lazy):
    """Module-level and function-level imports, absolute and relative, parsed from files."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.sub import low\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "high.py").write_text("from pkg.sub.low import f\n")
    body = "def g():\n    from .. import high\n" if lazy else "from pkg import high\n"
    (package / "sub" / "low.py").write_text(body + "def f():\n    pass\n")
    (package / "guarded.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.high\n")
    graph = import_graph(package)
    assert graph["pkg.guarded"] == {}
    assert find_cycles(graph) == [["pkg.high", "pkg.sub.low", "pkg.high"]]
