"""docs/architecture.md and the README's architecture tree name files and registries that exist.

The architecture description is a promise about the code's shape; this keeps it true when files
move: every path it names exists, and every registry or function it names can be imported.
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _paths(text: str) -> set[str]:
    """Backticked tokens that look like repository paths (a '/' or a .py/.md name)."""
    tokens = set(re.findall(r"`([^`\s]+)`", text))
    return {t for t in tokens if "/" in t or t.endswith((".py", ".md"))}


@pytest.mark.parametrize("path", sorted(_paths(DOC)))
def test_every_path_in_architecture_md_exists(path):
    assert list(ROOT.glob(path)), f"docs/architecture.md names {path}, which does not exist"


def test_every_file_in_the_readme_architecture_tree_exists():
    readme = (ROOT / "README.md").read_text()
    tree = readme.split("## Architecture", 1)[1].split("```", 2)[1]
    missing, folder = [], None
    for line in tree.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name or not re.fullmatch(r"[\w.]+/?|\.ci/run", name):
            continue
        depth = len(line) - len(line.lstrip())
        if depth not in (0, 2, 4):  # a description's continuation line
            continue
        if depth <= 2:
            folder = "bnjax" if depth == 2 else None
            path = f"{folder}/{name}" if folder else name
            if name.endswith("/"):
                folder = path.rstrip("/") if depth == 2 else name.rstrip("/")
        else:
            path = f"{folder}/{name}"
        if not (ROOT / path.rstrip("/")).exists():
            missing.append(path)
    assert not missing, f"README architecture names missing files: {missing}"


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
