"""The structure of `idlab/` (issue "One home per method"): imports go one way through the layers,
no import cycles, no library module over 500 lines, and no method named outside `idlab/methods/`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from idlab import methods

ROOT = Path(__file__).resolve().parents[1] / "idlab"

#: Layers, bottom up: a module may import its own component and any lower layer, never a higher one.
LAYERS: list[set[str]] = [
    {"errors", "atomic", "options", "jsontypes"},
    {"deltas", "models", "data", "d90", "subspace"},
    {"training"},
    {"methods"},
    {"config"},
    {"runs"},
    {"analysis", "sweep"},
    {"report"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, mods: dict[str, Path]) -> Iterator[str]:
    """Every idlab module ``path`` imports (at top level or inside functions; TYPE_CHECKING included)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n.startswith("idlab.") or n == "idlab":
                yield n


def _component(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else "idlab"


def _layer(comp: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if comp in layer)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(p, mods) if t != m and t != "idlab"} for m, p in mods.items()}


def test_every_component_has_a_layer() -> None:
    comps = {_component(m) for m in _modules()} - {"idlab"}
    assert comps <= set().union(*LAYERS), sorted(comps - set().union(*LAYERS))


def test_imports_go_downward_only() -> None:
    wrong = []
    for mod, targets in _graph().items():
        if mod == "idlab":  # the lazy public API re-exports from every layer
            continue
        for t in targets:
            a, b = _component(mod), _component(t)
            if a != b and _layer(b) >= _layer(a):
                wrong.append(f"{mod} -> {t}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v):], v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    assert not cycles, cycles


def test_no_library_module_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def _string_constants(tree: ast.AST) -> Iterator[ast.Constant]:
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            yield n


def test_no_method_is_named_outside_the_methods_package() -> None:
    """Dispatch goes through the registry: no registered method name as a string outside idlab/methods/."""
    names = set(methods.names())
    found = []
    for p in ROOT.rglob("*.py"):
        if p.relative_to(ROOT).parts[0] == "methods":
            continue
        for c in _string_constants(ast.parse(p.read_text())):
            if c.value in names:
                found.append(f"{p.relative_to(ROOT)}:{c.lineno} {c.value!r}")
    assert not found, found


def test_signatures_are_typed() -> None:
    """``Any`` in function signatures was 132 before the method registry; it stays below half of that."""
    count = 0
    for p in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                anns = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                        if x is not None and x.annotation is not None]
                count += any("Any" in ast.unparse(x) for x in [*anns, *([node.returns] if node.returns else [])])
    assert count <= 66, f"{count} signatures mention Any"
