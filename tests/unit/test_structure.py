"""The shape of ``src/``: no import cycle between modules, no module over 500 lines,
and each package importing only the layers below it (docs/design.md).

Imports are read from the source (``ast``), not executed; an import under
``if TYPE_CHECKING:`` is for types only and does not count.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"
MAX_LINES = 500

#: what each package may import from pynbd (besides itself); "*" = anything.
#: The layers of docs/design.md, bottom up.
ALLOWED: dict[str, set[str]] = {
    "pynbd.proto": set(),
    "pynbd.block": set(),
    "pynbd.server": {"pynbd.proto", "pynbd.block"},
    "pynbd.client": {"pynbd.proto"},
    "pynbd.qmp": {"pynbd.proto", "pynbd.block", "pynbd.server", "pynbd.cmdline"},
    "pynbd.check": {"pynbd.proto", "pynbd.block", "pynbd.client", "pynbd.cmdline"},
    "pynbd.cmdline": set(),
    # storage plugins shipped with pynbd, and the contract tests plugin authors run
    "pynbd.plugins": {"pynbd.block"},
    "pynbd.testing": {"pynbd.block"},
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_only(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skip


def imports_of(module: str) -> set[str]:
    """The modules of pynbd that ``module`` imports at run time (at any depth in the file)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [name if name in MODULES else base for name in names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one() -> None:
    """The checker itself can fail: a two-module and a three-module cycle are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    """No two modules of src/ import each other, directly or around a loop, at any
    depth of the file: a function-level import still ties the modules together."""
    graph = {module: imports_of(module) for module in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_short(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_says_what_it_owns(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    assert ast.get_docstring(tree), f"{module} has no docstring saying what it owns"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers(package: str) -> None:
    """A package imports only from the layers below it."""
    allowed = ALLOWED[package]
    wrong = []
    for module in MODULES:
        if module != package and not module.startswith(package + "."):
            continue
        for imported in imports_of(module):
            if imported == package or imported.startswith(package + "."):
                continue
            if imported == "pynbd":
                continue  # the version string
            if not any(imported == layer or imported.startswith(layer + ".")
                       for layer in allowed):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)
