"""The library stands on its own: no library module imports an application, and what a library
module imports when it loads is a dependency the library declares.

bnjax is two layers (docs/architecture.md, "Two layers"):

- the **library**: every module under bnjax/ except the two applications and the command lines;
  `pip install bnjax` gives it jax, flax, numpy and the few packages in pyproject.toml's
  ``dependencies``;
- the **applications**: bnjax/train (the training loop and its CLI) and bnjax/study (the
  batch-composition study), with their dependencies as extras (``bnjax[train]``,
  ``bnjax[study]``); and the command lines ``python -m bnjax.export`` / ``bnjax.lifecycle``
  (their ``__main__`` modules), which are entry points like scripts/.

Every module is parsed (not imported), its imports resolved, and two rules checked:

1. a library module never imports bnjax.train or bnjax.study, at any level (an import inside a
   function counts: it runs on a user's call);
2. an import at a library module's top level (run when the module loads) names the standard
   library, bnjax's library, or a package of the library's declared dependencies. An optional
   package (TFDS, grain, scikit-learn, jax2onnx, onnxruntime) is imported inside the function
   that needs it, or in a module that only the matching extra's users import (OPTIONAL).

tests/test_lean_install.py (slow, in CI) checks the same in a fresh virtual environment holding
only `pip install .`.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPLICATIONS = ("bnjax.train", "bnjax.study")

# Import names of the library's declared dependencies (pyproject.toml `dependencies`), keyed by
# distribution name; a distribution missing here fails `test_every_dependency_has_import_names`.
IMPORT_NAMES = {
    "jax": {"jax", "jaxlib"},
    "flax": {"flax"},
    "optax": {"optax"},
    "numpy": {"numpy"},
    "orbax-checkpoint": {"orbax"},
    "rich": {"rich"},
}
# Library modules that need an extra at import time: only that extra's users import them (the
# package's __init__ does not), and their import error names the extra.
OPTIONAL = {"bnjax.data.grain_pipeline": "data"}


def _is_application(module: str) -> bool:
    return module.startswith(tuple(f"{app}." for app in APPLICATIONS)) or module in APPLICATIONS


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> list[str]:
    """Every module of bnjax's library layer (dotted names)."""
    names = (_module_name(path) for path in sorted((ROOT / "bnjax").rglob("*.py")))
    return [n for n in names if not _is_application(n) and not n.endswith(".__main__")]


def _imports(tree: ast.Module, module: str, is_package: bool):
    """(line, the modules it imports, at top level?) of every import statement in `tree`."""
    package = module if is_package else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    # An import under `if TYPE_CHECKING:` or `try:` at the top still runs at load time.
    for node in tree.body:
        if isinstance(node, ast.If | ast.Try):
            top_level |= {id(child) for child in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names], id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from bnjax import train` imports the module bnjax.train.
            names = [f"{source}.{alias.name}" for alias in node.names] if source else []
            yield node.lineno, [source, *names], id(node) in top_level


def violations(source: str, module: str, is_package: bool, allowed: set[str]) -> list[str]:
    """The rule breaks of one library module's source (see the module docstring)."""
    found = []
    for line, names, top in _imports(ast.parse(source), module, is_package):
        applications = [name for name in names if _is_application(name)]
        if applications:
            found.append(f"{module}:{line} imports the application module {applications[0]}")
        root = names[0].split(".")[0]
        if top and root not in allowed and root != "bnjax" and root not in sys.stdlib_module_names:
            found.append(f"{module}:{line} imports {root} at load time, not a library dependency")
    return found


def _declared_import_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    distributions = {r.split(">")[0].split("=")[0].split("[")[0] for r in project["dependencies"]}
    return set().union(*(IMPORT_NAMES[d] for d in distributions if d in IMPORT_NAMES))


def test_every_dependency_has_import_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    distributions = {r.split(">")[0].split("=")[0].split("[")[0] for r in project["dependencies"]}
    assert distributions <= IMPORT_NAMES.keys(), sorted(distributions - IMPORT_NAMES.keys())


def test_no_library_module_imports_an_application_or_an_undeclared_package():
    allowed, found = _declared_import_names(), []
    for module in library_modules():
        path = ROOT / Path(*module.split("."))
        is_package = (path / "__init__.py").exists()
        source = (path / "__init__.py" if is_package else path.with_suffix(".py")).read_text()
        if module in OPTIONAL:
            allowed_here = allowed | _extra_import_roots(OPTIONAL[module])
        else:
            allowed_here = allowed
        found += violations(source, module, is_package, allowed_here)
    assert not found, "\n".join(found)


def _extra_import_roots(extra: str) -> set[str]:
    return {"data": {"grain", "tensorflow_datasets", "array_record", "PIL"}}[extra]


def test_the_layers_cover_the_package():
    modules = library_modules()
    assert "bnjax.core.batch_norm" in modules and "bnjax.lifecycle.recalibration" in modules
    assert not [m for m in modules if _is_application(m)]
    assert (ROOT / "bnjax" / "train" / "loop.py").exists(), "the applications moved: update"
    assert set(OPTIONAL) <= set(modules)


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("from bnjax.train import loop", "bnjax.export.exporting", 1),
        ("from bnjax import train", "bnjax.export.exporting", 1),
        ("import bnjax.study.report", "bnjax.diagnostics", 1),
        ("def f():\n    from bnjax.train.steps import make_model", "bnjax.lifecycle.layers", 1),
        ("from ..train import loop", "bnjax.lifecycle.layers", 1),
        ("from bnjax.lifecycle import layers", "bnjax.diagnostics", 0),
        ("import ml_collections", "bnjax.models.norms", 1),
        ("def f():\n    import sklearn", "bnjax.data.digits", 0),
        ("try:\n    import matplotlib\nexcept ImportError:\n    pass", "bnjax.progress", 1),
        ("import jax.numpy as jnp\nimport os", "bnjax.core.stats", 0),
    ],
)
def test_the_scan_finds_what_it_should(source, module, expected):
    allowed = {"jax", "numpy", "flax"}
    assert len(violations(source, module, False, allowed)) == expected
