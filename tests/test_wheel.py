"""The wheel a user installs works: `python -m build` builds it, it installs into a fresh virtual
environment, and tests pass against the installed copy rather than the source tree.

The fresh environment also sees this interpreter's site-packages (a `.pth` file listing them,
after its own), so jax and the other dependencies are not downloaded again; bnjax itself comes
only from the wheel (`--no-deps`), found first, and the tests run from a temporary directory
holding copies of them, with `--import-mode=importlib`, so no path leads back to this
checkout. Building needs setuptools from the package index (build isolation), as for a user.
"""

import os
import re
import shutil
import site
import sys
import zipfile
from pathlib import Path

import pytest

from tests.source_copy import ROOT, clean_copy, run

# A part of the suite that touches every layer quickly: the core, the flax modules, the
# lifecycle, the data pipeline and the models, against the installed package.
TESTS = [
    "tests/core/test_batch_norm.py",
    "tests/test_linen.py",
    "tests/test_nnx.py",
    "tests/lifecycle/test_fold.py",
    "tests/data/test_samplers.py",
]
SUPPORT = ["tests/__init__.py", "tests/conftest.py", "tests/core/__init__.py"]
SUPPORT += ["tests/core/reference.py", "tests/lifecycle/__init__.py"]
SUPPORT += ["tests/lifecycle/helpers.py", "tests/data/__init__.py"]


@pytest.mark.slow
def test_the_wheel_installs_and_passes_tests_outside_the_source_tree(tmp_path):
    source = clean_copy(tmp_path / "source")  # no build/ or egg-info of this checkout
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist")], cwd=source)
    (wheel,) = (tmp_path / "dist").glob("bnjax-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnjax").rglob("*.py")}
    assert modules <= set(names), f"missing from the wheel: {sorted(modules - set(names))}"
    assert not [n for n in names if n.startswith(("tests/", "docs/", "scripts/"))]
    assert any(n.endswith("licenses/LICENSE") for n in names), "the LICENSE is not in the wheel"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    (venv_site,) = venv.glob("lib/python*/site-packages")
    # The dependencies: this interpreter's site-packages, searched after the venv's own. A
    # .pth line adds a directory but does not run the .pth files in it (no editable bnjax).
    (venv_site / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])

    work = tmp_path / "work"  # only the tests: nothing here is importable as bnjax
    for name in [*TESTS, *SUPPORT]:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, work / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    where = run(
        [python, "-c", "import bnjax, sys; print(bnjax.__file__); print(bnjax.__version__)"],
        cwd=work,
        env=env,
    ).split()
    installed = Path(where[0]).resolve()
    assert installed.is_relative_to(venv.resolve()) and "site-packages" in installed.parts
    assert where[1] == "0.1.0"

    output = run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            "-o",
            "addopts=",
            "-m",
            "not slow",
            "--rootdir",
            str(work),
            *TESTS,
        ],
        cwd=work,
        env=env,
    )
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 150 and "failed" not in output, output[-2000:]
