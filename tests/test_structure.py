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


# ---------------------------------------------------------------- the CLI reads the library's registries

CLI = PACKAGE / "cli.py"


def _choice_arguments(tree: ast.AST):
    """(line, node) of every choices= argument and every choice list handed to cli._csv."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg == "choices":
                yield node.lineno, keyword.value
        if isinstance(node.func, ast.Name) and node.func.id == "_csv" and len(node.args) > 1:
            yield node.lineno, node.args[1]


def test_the_cli_writes_no_choice_list_of_its_own():
    tree = ast.parse(CLI.read_text())
    literal = (ast.Tuple, ast.List, ast.Set, ast.Dict, ast.Constant, ast.ListComp, ast.GeneratorExp)
    found = list(_choice_arguments(tree))
    assert len(found) >= 10
    import importlib

    def read_on_use(value) -> bool:  # cli._Registry("module:NAME"): a registry of the library, read on use
        if not (isinstance(value, ast.Call) and getattr(value.func, "id", "") == "_Registry"):
            return False
        module, name = value.args[0].value.split(":")
        assert hasattr(importlib.import_module(f"mobilenets.{module}"), name), ast.unparse(value)
        return True

    written = [f"cli.py:{line}: {ast.unparse(value)}" for line, value in found
               if any(isinstance(n, literal) for n in ast.walk(value)) and not isinstance(value, ast.Subscript)
               and not read_on_use(value)]
    assert not written, "choice lists written in cli.py; read the library's registry instead: " + "; ".join(written)


def _option(parser, command: str, flag: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub, next(a for a in sub._actions if flag in a.option_strings)


@pytest.mark.parametrize("command, flag, registry", [
    ("export", "--format", "mobilenets.deploy:EXPORT_FORMATS"),
    ("export", "--precision", "mobilenets.deploy:EXPORT_PRECISIONS"),
    ("export", "--io", "mobilenets.deploy.tflite_graph:IO_TYPES"),
    ("pick", "--precision", "mobilenets.deploy:PRECISIONS"),
    ("pick", "--backend", "mobilenets.deploy:COMPILE_BACKENDS"),
    ("pick", "--runtime", "mobilenets.pick:DEVICE_RUNTIMES"),
    ("pick", "--accelerator", "mobilenets.device_latency:ACCELERATORS"),
    ("convert", "--from", "mobilenets.weights:SOURCES"),
    ("predict", "--precision", "mobilenets.deploy:PRECISIONS"),
    ("predict", "--backend", "mobilenets.predict:BACKENDS"),  # deploy.SERVE_BACKENDS, read without PyTorch
    ("quantize", "--method", "mobilenets.quantize:METHODS"),
])
def test_the_help_lists_exactly_the_registry(command, flag, registry):
    import importlib

    from mobilenets.cli import build_parser

    module, name = registry.split(":")
    expected = list(getattr(importlib.import_module(module), name))
    sub, action = _option(build_parser(), command, flag)
    assert list(action.choices) == expected
    # listed as argparse does ({a,b}), or, where the registry is read on use (cli._Registry), in the option's help
    shown = " ".join(sub.format_help().split())
    assert "{" + ",".join(expected) + "}" in shown or ": " + ", ".join(expected) + " (" in shown


@pytest.mark.parametrize("flag, registry", [("--backend", "COMPILE_BACKENDS"), ("--precision", "PRECISIONS")])
def test_benchmark_lists_accept_exactly_the_registry(flag, registry):
    from mobilenets import deploy
    from mobilenets.cli import build_parser

    expected = list(getattr(deploy, registry))
    _, action = _option(build_parser(), "benchmark", flag)
    assert action.type(",".join(expected)) == expected
    with pytest.raises(Exception, match="not in"):
        action.type("not-a-" + flag.strip("-"))


def test_converters_are_one_table():
    from mobilenets import weights

    assert weights.SOURCES == tuple(weights.CONVERTERS) == ("keras", "tf-slim", "tf-frozen", "timm", "tflite")
    assert set(weights.SUFFIX_SOURCES.values()) <= set(weights.SOURCES)


def test_a_lazy_packages_type_checking_imports_are_its_table():
    # mobilenets.deploy imports its names on first use (_EXPORTS, PEP 562) so that its registries load without
    # PyTorch; type checkers and the API reference see them through the TYPE_CHECKING imports: the two must agree
    import importlib

    tree = ast.parse((PACKAGE / "deploy" / "__init__.py").read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "_EXPORTS")
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    imported = {alias.name: ("." * node.level if node.level > 1 else "") + node.module for node in block.body
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert imported == table
    deploy = importlib.import_module("mobilenets.deploy")
    assert all(getattr(deploy, name) is not None for name in deploy.__all__)
