"""The architecture as a test: every import of fxquant and of passes/ (imports inside functions
included) goes down the layers, never in a cycle, and no pass imports another pass.

Layers, lowest first (docs/architecture.md draws them):

    errors, version < ir < quant < runtime < infra < lowering < passes < analysis, io < report
    < api (fxquant/__init__, api, pipeline, debug) < cli (fxquant/cli, __main__)

A module may import its own package and any lower layer; two packages of one layer may not
import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400

# each package or top-level module: (its group, the group's layer); a group may import itself
LAYER = {
    "fxquant.errors": ("base", 0),
    "fxquant.version": ("base", 0),
    "fxquant.ir": ("ir", 1),
    "fxquant.quant": ("quant", 2),
    "fxquant.runtime": ("runtime", 3),
    "fxquant.infra": ("infra", 4),
    "fxquant.lowering": ("lowering", 5),
    "fxquant.passes": ("passes", 6),
    "fxquant.analysis": ("analysis", 7),
    "fxquant.io": ("io", 7),
    "fxquant.report": ("report", 8),
    "fxquant": ("api", 9),
    "fxquant.api": ("api", 9),
    "fxquant.pipeline": ("api", 9),
    "fxquant.debug": ("api", 9),
    "fxquant.cli": ("cli", 10),
    "fxquant.__main__": ("cli", 10),
}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "fxquant").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    for path in sorted((ROOT / "passes").glob("*.py")):
        files["fxquant.passes" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return files


MODULES = _module_files()


def _package(module: str) -> str:
    """The layer key of a module: its longest prefix in LAYER."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYER:
            return key
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYER in {__file__}")


def _imported(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported fxquant module, line, inside a function) for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return [(name, line, fn) for name, line, fn in found if name == "fxquant" or name.startswith("fxquant.")]


def _import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for module, path in MODULES.items():
        g.add_node(module)
        for target, line, in_function in _imported(module, path):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                g.add_edge(module, target, line=line, in_function=in_function)
    return g


GRAPH = _import_graph()


def _where(a: str, b: str) -> str:
    data = GRAPH.edges[a, b]
    inside = " (inside a function)" if data["in_function"] else ""
    return f"{MODULES[a].relative_to(ROOT)}:{data['line']} imports {b}{inside}"


def test_every_module_has_a_layer():
    for module in MODULES:
        _package(module)


def test_imports_go_down_the_layers():
    bad = []
    for a, b in GRAPH.edges:
        (ga, ra), (gb, rb) = LAYER[_package(a)], LAYER[_package(b)]
        if ga == gb and not (b == "fxquant" and a != "fxquant"):
            continue
        if b == "fxquant" and ra <= LAYER["fxquant"][1]:
            bad.append(_where(a, b) + " (the public package: import the module that defines the name)")
        elif rb >= ra:
            bad.append(_where(a, b) + f" (layer {gb} is not below {ga})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    # the package __init__ files that re-export their modules form trivial package<->module loops
    g = GRAPH.copy()
    for a, b in list(g.edges):
        if MODULES[b].name == "__init__.py" and a.startswith(b + "."):
            g.remove_edge(a, b)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles[:10])


def test_no_pass_imports_another_pass():
    bad = [_where(a, b) for a, b in GRAPH.edges if a.startswith("fxquant.passes.") and b.startswith("fxquant.passes")]
    assert not bad, "passes share code through the core, not through each other:\n" + "\n".join(bad)


def test_no_function_level_import_of_fxquant():
    """Every fxquant import is at the top of its module, where the reader (and the cycle check)
    sees it; a function-level import is how a cycle hides."""
    hidden = [
        f"{MODULES[a].relative_to(ROOT)}:{data['line']} imports {b} inside a function"
        for a, b, data in GRAPH.edges(data=True)
        if data["in_function"]
    ]
    assert not hidden, "function-level imports:\n  " + "\n  ".join(sorted(hidden))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


def test_the_test_sees_a_planted_cycle(tmp_path):
    """The walker itself: a function-level import back up the layers is seen."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from fxquant.api import compile\n")
    assert ("fxquant.api", 2, True) in _imported("fxquant.ir.m", src)
