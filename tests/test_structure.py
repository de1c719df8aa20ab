"""The package's layout: each module depends only on modules below it (no import cycle).

The graph is read from the source with ``ast``, not by importing, so it holds
every import: at module level, inside functions (a lazy import is still a
dependency) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mobilenets"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(name: str, is_package: bool, node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules that one import statement in module ``name`` loads by name."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        here = name.split(".") if is_package else name.split(".")[:-1]
        base = here[:len(here) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target not in modules:
        return set()
    submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
    # ``from .pkg import sub, name``: sub is a module of its own; any other name comes from pkg's __init__
    return submodules | ({target} if len(submodules) < len(node.names) else set())


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source."""
    paths = {module_name(p, root.parent): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set().union(*(imported(name, path.name == "__init__.py", n, set(paths)) for n in ast.walk(tree)))
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    found, state, stack = [], {}, []
    seen_in_cycle: set[str] = set()

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open" and w not in seen_in_cycle:
                loop = stack[stack.index(w):] + [w]
                seen_in_cycle.update(loop)
                found.append(loop)
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["mobilenets.builders"] >= {"mobilenets.model", "mobilenets.weights"}
    loops = cycles(graph)
    assert not loops, "import cycles (move the shared code below both modules): " + "; ".join(
        " -> ".join(loop) for loop in loops)


@pytest.mark.parametrize("source, expected", [
    # a lazy import inside a function closes the loop as surely as one at the top
    ({"a.py": "from . import b\n", "b.py": "def f():\n    from .a import g\n"}, [["pkg.a", "pkg.b", "pkg.a"]]),
    # a package's __init__ and a submodule that imports a name from it
    ({"__init__.py": "from .c import h\n", "c.py": "from . import Error\n"}, [["pkg", "pkg.c", "pkg"]]),
    # "from . import sub" is an edge to the submodule, not to the package
    ({"__init__.py": "from .c import h\n", "c.py": "from . import d\n", "d.py": ""}, []),
    ({"a.py": "from .sub.x import y\n", "sub/__init__.py": "", "sub/x.py": "from ..a import z\n"},
     [["pkg.a", "pkg.sub.x", "pkg.a"]]),
])
def test_cycles_are_found_through_every_kind_of_import(tmp_path, source, expected):
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **source}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert cycles(import_graph(root)) == expected
