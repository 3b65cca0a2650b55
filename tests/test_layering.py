"""The package reads as the pipeline: imports flow one way through the subpackages, no module takes
another's private names, no module grows past what one reader takes in, and in-function imports are kept
for heavy third-party libraries (and for the CLI, whose `qkit --help` must not import torch)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qkit"
# Low to high: a module may import from its own layer and the layers before it, never from one after.
LAYERS = ("qkit", "core", "data", "models", "quant", "evaluation", "plan", "studies", "report", "cli")
MAX_LINES = 440
LAZY_QKIT_IMPORTS_OK = ("cli",)  # start-up time of the command line


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "qkit")


def _imports(module: str) -> list[tuple[str, list[str], bool, int]]:
    """(imported qkit module, names taken from it, inside a function?, line) for every import."""
    tree = ast.parse(MODULES[module].read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in in_function, node.lineno) for a in node.names if a.name.startswith("qkit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qkit"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                target = sub if sub in MODULES else node.module
                out.append((target, [] if target == sub else [a.name], id(node) in in_function, node.lineno))
    return out


def test_the_package_has_the_layers_it_declares() -> None:
    assert {m.split(".")[1] for m in MODULES if "." in m} == set(LAYERS[1:])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module: str) -> None:
    upward = [f"line {line}: {target}" for target, _, _, line in _imports(module)
              if target in MODULES and _layer(target) > _layer(module)]
    assert not upward, f"{module} ({LAYERS[_layer(module)]}) imports from a later layer: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module: str) -> None:
    taken = [f"{target}.{name}" for target, names, _, _ in _imports(module) for name in names
             if name.startswith("_") and target != module]
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qkit"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    taken += [f"{aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
              if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
              and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not taken, f"{module} uses private names of other modules: {taken}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_qkit_modules_are_imported_at_the_top(module: str) -> None:
    if LAYERS[_layer(module)] in LAZY_QKIT_IMPORTS_OK:
        return
    lazy = [f"line {line}: {target}" for target, _, inside, line in _imports(module) if inside]
    assert not lazy, f"{module} imports qkit modules inside functions (a hidden cycle?): {lazy}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ re-exports its submodules: that edge is not a dependency of the submodule.
    for m in MODULES:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    done, stack = set(), []

    def visit(m: str) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable_in_one_sitting(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines: split it by concern"
