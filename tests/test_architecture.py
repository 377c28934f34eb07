"""The import graph of our packages, read from their source (every import: top level, inside functions,
under TYPE_CHECKING; relative ones resolved): no file-level import cycle, and layers import only downward

    potluck → pipeline, credits → dht → p2p        bench, netlab: may import anything, imported by none of them
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERED = ("potluck", "pipeline", "credits", "dht", "p2p")
TOOLS = ("bench", "netlab")
# package → the packages it must not import
FORBIDDEN = {
    "p2p": {"dht", "pipeline", "credits", "potluck", *TOOLS},
    "dht": {"pipeline", "credits", "potluck", *TOOLS},
    "credits": {"pipeline", "potluck", *TOOLS},
    "pipeline": {"potluck", *TOOLS},
    "potluck": {*TOOLS},
}


@dataclass(frozen=True)
class Import:
    source: str  # module that imports
    target: str  # module of ours it imports
    line: int


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every .py in `packages` (a package is its __init__.py)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The imports in `path` (module `name`) of modules in `modules`, resolved to the most specific one."""

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [ours(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is this package, 2 its parent, ...
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            targets = [ours(f"{base}.{alias.name}") if alias.name != "*" else ours(base) for alias in node.names]
        else:
            continue
        found += [Import(name, target, node.lineno) for target in targets if target is not None and target != name]
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(root, LAYERED + TOOLS)
    return modules, [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component with more than one module."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
        graph.setdefault(e.target, [])
    # Tarjan's algorithm, iterative
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: dict[str, list[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if succ in component and succ not in came_from:
                    came_from[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its component")


def layer_violations(modules: dict[str, Path], edges: list[Import]) -> list[str]:
    return [f"{modules[e.source].relative_to(ROOT)}:{e.line} imports {e.target}" for e in edges
            if e.target.partition(".")[0] in FORBIDDEN.get(e.source.partition(".")[0], ())]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_package_is_read(graph):
    modules, edges = graph
    assert {name.partition(".")[0] for name in modules} == set(LAYERED + TOOLS)
    assert {e.source.partition(".")[0] for e in edges} >= {"potluck", "pipeline", "dht"}


def test_no_import_cycle(graph):
    modules, edges = graph
    line = {(e.source, e.target): e.line for e in reversed(edges)}  # the first import of each pair

    def show(cycle: list[str]) -> str:
        steps = [f"{modules[a].relative_to(ROOT)}:{line[a, b]}" for a, b in zip(cycle, cycle[1:])]
        return " → ".join([*steps, str(modules[cycle[-1]].relative_to(ROOT))])

    found = cycles(edges)
    assert not found, "import cycles between files (file:line of the import):\n" + "\n".join(
        "  " + show(cycle) for cycle in found)


def test_layers_import_only_downward(graph):
    modules, edges = graph
    bad = layer_violations(modules, edges)
    assert not bad, "imports against the layer order (potluck → pipeline, credits → dht → p2p):\n" + "\n".join(
        "  " + b for b in bad)
