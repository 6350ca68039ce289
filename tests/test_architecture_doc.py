"""docs/architecture.md and the README's architecture section name files and registries that exist.

The architecture description is a promise about the code's shape; this keeps it true when files
move: every path either names (in backticks or in their code trees) exists, and every registry
or function docs/architecture.md names can be imported.
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
README = (ROOT / "README.md").read_text()
# Paths the README names that a command writes (they exist after `python -m build`, a training
# run or `mkdocs build`, not in a clean checkout).
GENERATED = ("dist/", "site/", "workdir/")


def _paths(text: str) -> set[str]:
    """Backticked tokens that look like repository paths (a '/' or a .py/.md name)."""
    tokens = set(re.findall(r"`([^`\s]+)`", text))
    return {t for t in tokens if "/" in t or t.endswith((".py", ".md"))}


@pytest.mark.parametrize("path", sorted(_paths(DOC)))
def test_every_path_in_architecture_md_exists(path):
    assert list(ROOT.glob(path)), f"docs/architecture.md names {path}, which does not exist"


@pytest.mark.parametrize("path", sorted(p for p in _paths(README) if not p.startswith(GENERATED)))
def test_every_path_in_the_readme_exists(path):
    assert list(ROOT.glob(path)), f"README.md names {path}, which does not exist"


def _tree(text: str, heading: str) -> str:
    """The first fenced block after `heading`."""
    return text.split(heading, 1)[1].split("```", 2)[1]


def _tree_paths(tree: str) -> list[str]:
    """The paths of a code tree: one entry per line at an even indent (two spaces a level),
    a folder ending in '/' holding the deeper entries below it; description lines that wrap
    sit at a deeper, odd column and are skipped."""
    paths, folders = [], []  # folders: [(indent, 'bnjax/core/')]
    for line in tree.splitlines():
        name = line.strip().split(" ", 1)[0]
        indent = len(line) - len(line.lstrip())
        if not name or indent % 2 or indent > 6 or not re.fullmatch(r"\.?[\w./]+", name):
            continue
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (folders[-1][1] if folders else "") + name
        paths.append(path.rstrip("/"))
        if name.endswith("/"):
            folders.append((indent, path))
    return paths


@pytest.mark.parametrize(
    ("where", "text", "heading", "at_least"),
    [
        ("README.md", README, "## Architecture", 15),
        ("docs/architecture.md", DOC, "## The code tree", 35),
    ],
)
def test_every_file_in_the_code_trees_exists(where, text, heading, at_least):
    paths = _tree_paths(_tree(text, heading))
    assert len(paths) >= at_least, f"{where}: the tree parser found only {paths}"
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"{where}'s code tree names missing files: {missing}"


def test_the_tree_parser_nests_folders():
    tree = (
        "bnjax/\n  core/   the core\n    stats.py  moments\n"
        "                wrapped line\n  nnx.py\ndocs/\n"
    )
    assert _tree_paths(tree) == [
        "bnjax",
        "bnjax/core",
        "bnjax/core/stats.py",
        "bnjax/nnx.py",
        "docs",
    ]


@pytest.mark.parametrize(
    "dotted",
    [
        "bnjax.models.MODELS",
        "bnjax.models.NORMS",
        "bnjax.data.DATASETS",
        "bnjax.data.SAMPLERS",
        "bnjax.data.GROUPINGS",
        "bnjax.train.optim.OPTIMIZERS",
        "bnjax.train.optim.SCHEDULES",
        "bnjax.parallel.local_rows",
        "bnjax.parallel.process_rows",
        "bnjax.train.steps.make_model",
        "bnjax.train.steps.make_train_step",
        "bnjax.train.loop.model_settings",
        "bnjax.train.loop.schedule_and_optimizer",
    ],
)
def test_named_registries_and_functions_exist(dotted):
    module, name = dotted.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), name), dotted
