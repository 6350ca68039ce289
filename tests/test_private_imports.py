"""No package imports another package's private names (a leading underscore).

Every module under bnjax/, scripts/ and benchmarks/ is parsed (not imported) and each import
of a private module or name is checked against its owner, the package that defines it:

- ``from bnjax.lifecycle import _backends`` and ``import bnjax.lifecycle._backends``: a private
  module, owned by its package, bnjax.lifecycle;
- ``from bnjax.lifecycle._backends import Linen``: a name of a private module, same owner;
- ``from bnjax.checkpoints.checkpointer import _remove_unfinished``: a private name of a
  module, owned by the module's package, bnjax.checkpoints.

Only modules of the owning package itself may import it. Every package is its own: a
subpackage (bnjax.core) does not share the privates of its parent (bnjax), nor the other way
round. Dunder names (``__main__``, ``__version__``) are not private.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("bnjax", "scripts", "benchmarks")

# Imports that break the rule in modules outside this change's reach, to be fixed where they
# are; each entry is (file relative to the repository root, the import as reported below).
# The integrator empties this list; the test fails on an entry that no longer occurs.
ALLOWED: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> tuple[str, str]:
    """(dotted module name, its package) of a file; scripts are packages of their own."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


def _owner(module: str, name: str | None = None) -> str | None:
    """The package that owns `module` (or `name` imported from it), None when public.

    The owner of a private module is the package above its first private component; of a
    private name, the module's package (the module itself when it is a package).
    """
    parts = module.split(".")
    for index, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:index])
    if name is not None and _private(name):
        return module if _is_package(module) else ".".join(parts[:-1])
    return None


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations_in(source: str, module: str, package: str) -> list[tuple[int, str]]:
    """[(line, description)] of the imports of bnjax privates owned by another package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        imported = []  # (module, name or None, how it is written)
        if isinstance(node, ast.Import):
            imported = [(alias.name, None, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node, package)
            imported = [
                (source_module, alias.name, f"from {source_module} import {alias.name}")
                for alias in node.names
            ]
        for source_module, name, text in imported:
            if source_module != "bnjax" and not source_module.startswith("bnjax."):
                continue
            owner = _owner(source_module, name)
            if owner is None and name is not None and _is_package(source_module):
                owner = _owner(f"{source_module}.{name}")  # from package import _module
            if owner is not None and owner != package:
                found.append((node.lineno, f"{text} (private to {owner})"))
    return found


def _scan() -> dict[tuple[str, str], int]:
    found = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            module, package = _module_name(path)
            relative = str(path.relative_to(ROOT))
            for line, text in violations_in(path.read_text(encoding="utf-8"), module, package):
                found[(relative, text)] = line
    return found


def test_no_package_imports_another_packages_privates():
    found = _scan()
    new = sorted(f"{path}:{found[(path, text)]}: {text}" for path, text in found.keys() - ALLOWED)
    assert not new, "imports of another package's private names:\n" + "\n".join(new)
    stale = sorted(ALLOWED - found.keys())
    assert not stale, f"fixed: remove these entries from ALLOWED: {stale}"


@pytest.mark.parametrize(
    "source, module, package, expected",
    [
        ("from bnjax.lifecycle import _layers", "bnjax.diagnostics", "bnjax", 1),
        ("from bnjax.lifecycle import _layers", "bnjax.lifecycle.fold", "bnjax.lifecycle", 0),
        ("from bnjax.lifecycle._backends import Linen", "bnjax.train.loop", "bnjax.train", 1),
        ("import bnjax.train._leaves as leaves", "scripts.train", "scripts", 1),
        ("from bnjax.train.checkpoints import _tmp", "bnjax.train.loop", "bnjax.train", 0),
        ("from bnjax.train.checkpoints import _tmp", "bnjax.study.runner", "bnjax.study", 1),
        ("from bnjax.linen import _private", "bnjax.core.stats", "bnjax.core", 1),
        ("from bnjax.core.stats import _private", "bnjax.linen", "bnjax", 1),
        ("from ._layers import path_str", "bnjax.lifecycle.fold", "bnjax.lifecycle", 0),
        ("from .._leaves import crc32", "bnjax.study.runner", "bnjax.study", 1),
        ("from bnjax.lifecycle.__main__ import main", "scripts.validate", "scripts", 0),
        ("from bnjax.lifecycle.layers import path_str", "bnjax.diagnostics", "bnjax", 0),
    ],
)
def test_the_scan_finds_what_it_should(source, module, package, expected):
    assert len(violations_in(source, module, package)) == expected
