"""softshare's import graph: no cycles, the layering of docs/DESIGN.md, no hidden imports.

The graph is read from the source with `ast` (nothing is imported), so a cycle fails here even
where a lazy import would hide it at run time.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softshare"

# What each part of softshare may import (besides itself); see docs/DESIGN.md, "Layout".
BASE = {"errors", "storage", "version", "wrappers", "device", "progress", "pretrained"}
ALLOWED = {
    "errors": set(), "storage": {"errors"}, "version": set(), "wrappers": set(), "device": {"errors"}, "progress": set(),
    "pretrained": {"errors"},
    "layers": {"errors"},
    "models": {"errors", "layers"},
    "analysis": BASE | {"layers"},
    "fold": BASE | {"layers", "models", "analysis"},
    "checkpoint": BASE | {"layers", "models"},
    "data": BASE,
    "convert": BASE | {"layers", "models", "checkpoint", "data"},
    "eval": BASE | {"layers", "models", "analysis", "fold", "checkpoint", "data"},
    "train": BASE | {"layers", "models", "analysis", "fold", "checkpoint", "data", "convert", "eval"},
    "studies": BASE | {"layers", "models", "analysis", "fold", "checkpoint", "data", "eval", "train"},
    "cli": BASE | {"layers", "models", "analysis", "fold", "checkpoint", "data", "eval", "train", "convert",
                   "studies"},
}
OPTIONAL_DEPENDENCIES = {"sklearn", "wandb"}  # may be imported inside the function that needs them
OPTIONAL_MODULES = {"torch.utils.tensorboard", "torch.utils.tensorboard.summary"}  # need the optional `tensorboard`


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Absolute names of the softshare modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "softshare"]
    if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "softshare":
        return []
    known = modules()
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
    return submodules or [target]


@functools.cache
def imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported softshare module, line, inside a function)]."""
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for node in ast.walk(fn)}
        edges = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, path.name == "__init__.py", node):
                    edges.append((target, node.lineno, id(node) in in_function))
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in graph.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_is_read():
    graph = {name: {target for target, _, _ in edges} for name, edges in imports().items()}
    assert "softshare.layers.fast_mix" in graph["softshare.layers.bank"]  # from .fast_mix import ...
    assert "softshare.models" in graph["softshare.fold.core"]  # from ..models import ...
    assert "softshare.analysis.lsm" in graph["softshare.train.loop"]  # from ..analysis.lsm import ...


def test_no_import_cycle():
    graph = {name: [target for target, _, _ in edges] for name, edges in imports().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_no_import_inside_a_function():
    """Function-level imports hide cycles; only optional third-party packages may be imported late."""
    hidden = [f"{name}:{line} imports {target}" for name, edges in imports().items()
              for target, line, inside in edges if inside]
    assert not hidden, hidden
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                assert all(n.split(".")[0] in OPTIONAL_DEPENDENCIES or n in OPTIONAL_MODULES for n in names), f"{path}:{node.lineno}"


@pytest.mark.parametrize("source", sorted(ALLOWED))
def test_layering(source):
    """Each part imports only the parts below it (docs/DESIGN.md): e.g. models never import fold."""
    wrong = sorted({f"{name} imports {target}" for name, edges in imports().items() if part(name) == source
                    for target, _, _ in edges if part(target) not in ALLOWED[source] | {source, ""}})
    assert not wrong, wrong


def test_every_part_has_a_rule():
    assert {part(name) for name in modules()} - {"", "__main__"} == set(ALLOWED)


def test_no_global_matplotlib_backend():
    """Library code draws with matplotlib's object API and never switches the global backend."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for alias in node.names}
        calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert "matplotlib.use" not in calls and not any("pyplot" in name for name in imported), path


def test_import_softshare_is_light_and_every_export_resolves():
    """`import softshare` loads neither torch, matplotlib nor train/ (the names load on first use),
    and every name in `softshare.__all__` resolves to the object its module defines."""
    probe = ("import sys, softshare\n"
             "print(sorted(m for m in ('torch', 'matplotlib', 'softshare.train', 'softshare.studies') if m in sys.modules))\n"
             "from softshare import TemplateBank\n"
             "import softshare.layers\n"
             "print(TemplateBank is softshare.layers.TemplateBank, 'matplotlib' in sys.modules)\n"
             "print(all(getattr(softshare, name) is not None for name in softshare.__all__))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.split("\n")[:3] == ["[]", "True False", "True"], out.stderr
