"""The package's shape, checked: no module imports another subpackage's private module, no
import cycle between modules (at module level), and every public result on one contract.
The one import direction between subpackages is import-linter's (`pyproject.toml`, run by
scripts/check.sh)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import networkx as nx

import tl_decomp
from tl_decomp._core import Result

ROOT = Path(tl_decomp.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        if "data" in path.relative_to(ROOT).parts:
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module, *, top_only: bool) -> set[str]:
    """Modules a module imports (``from a import b`` counts ``a.b`` where that is a module)."""
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_decomp"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in _PACKAGES) else ""


_PACKAGES = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


def test_no_module_imports_another_subpackages_private_module():
    modules = _modules()
    bad = []
    for name, tree in modules.items():
        for target in _imports(tree, top_only=False) & modules.keys():
            private = any(part.startswith("_") for part in target.split(".")[2:])
            if private and _subpackage(target) != _subpackage(name):
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = nx.DiGraph()
    for name, tree in modules.items():
        graph.add_node(name)
        for target in _imports(tree, top_only=True) & modules.keys():
            # a package's __init__ re-exports its modules: not an edge back into the package
            if target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def _results() -> list[type]:
    return [
        obj
        for name in tl_decomp.__all__
        if inspect.isclass(obj := getattr(tl_decomp, name)) and dataclasses.is_dataclass(obj)
        and name not in ("ModelSpec", "DecompositionRecipe")
    ]  # fmt: skip


def test_every_public_result_is_a_frozen_result():
    results = _results()
    assert len(results) >= 15
    for cls in results:
        assert issubclass(cls, Result), cls
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
        assert "rows" in {n for c in cls.__mro__ if c is not Result for n in vars(c)}, cls
