"""The house's shape: imports point one way (no circle, at module level or inside functions), MLflow
is imported only by the tracking package and the pyfunc wrapper, no module outgrows 600 lines, and
every package says in its first line what lives there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import convcg_cli

PACKAGE_DIR = Path(convcg_cli.__file__).parent
MAX_MODULE_LINES = 600
MLFLOW_IMPORTERS = ("convcg_cli.tracking", "convcg_cli.serve.pyfunc")  # the only rooms that may


def module_name(path: Path) -> str:
    """``convcg_cli/data/contract/__init__.py`` -> ``convcg_cli.data.contract``."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_names(path: Path) -> list[str]:
    """Every module an ``import``/``from`` statement of the file names, anywhere in the file (inside
    functions too: a lazy import is still a dependency). ``from a import b`` names ``a.b`` when that
    is a module, else ``a``; relative imports are resolved against the file's package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """convcg_cli module -> the convcg_cli modules it imports."""
    return {
        name: {n for n in imported_names(path) if n in MODULES and n != name}
        for name, path in MODULES.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), and
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_a_package_and_its_modules_do_not_import_back_up():
    """A subpackage's modules never import their own package's ``__init__`` (which re-exports them):
    that is a circle Python hides until an import order changes."""
    graph = import_graph()
    offenders = [
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if MODULES[target].name == "__init__.py" and name.startswith(target + ".")
    ]
    assert not offenders, offenders


def test_mlflow_is_imported_only_by_tracking_and_the_pyfunc_wrapper():
    offenders = [
        name
        for name, path in MODULES.items()
        if not name.startswith(MLFLOW_IMPORTERS)
        and any(n == "mlflow" or n.startswith("mlflow.") for n in imported_names(path))
    ]
    assert not offenders, f"MLflow imported outside convcg_cli.tracking: {offenders}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_outgrows_600_lines(name):
    n_lines = len(MODULES[name].read_text().splitlines())
    assert n_lines <= MAX_MODULE_LINES, f"{name} has {n_lines} lines; split it by concern"


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_lives_there(name):
    docstring = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert docstring and len(docstring.splitlines()[0]) > 20, f"{name}/__init__.py needs a one-line purpose"
