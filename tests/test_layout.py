"""The package layout: no import circles between modules or between subpackages (a static read of the imports)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _imports(path: Path) -> set[str]:
    """Every dfqbench module `path` imports (at any depth of the file: lazy imports count too)."""
    name, is_package = _module_name(path)
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` may import a module
    return {m for m in found if m.split(".")[0] == "dfqbench"}


def _graph(unit) -> dict[str, set[str]]:
    """unit(module name) -> the node a module belongs to (itself, or its subpackage)."""
    modules = {_module_name(p)[0]: p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue  # a package's __init__ gathers its children; children importing siblings is not a circle
        targets = {t for t in _imports(path) if t in modules and modules[t].name != "__init__.py"}
        graph.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _subpackage(name: str) -> str:
    """dfqbench.quant.kernels.backend -> dfqbench.quant.kernels; top-level modules stand for themselves."""
    modules = {_module_name(p)[0]: p for p in SRC.rglob("*.py")}
    return name if modules[name].name == "__init__.py" else name.rsplit(".", 1)[0] if name.count(".") > 1 else name


@pytest.mark.parametrize("level", ["module", "subpackage"])
def test_no_import_circles(level):
    graph = _graph((lambda n: n) if level == "module" else _subpackage)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
