"""The library works with only its own dependencies: `pip install .` into a fresh virtual
environment (no extras), then every library module imports and batch norm, group norm,
recalibration and folding run there (tests/lean_smoke.py), while the applications refuse to
import with the command that installs their extra.

The environment sees nothing of this interpreter: its packages come from the package index
(pip's configured one), as for a user, and the smoke script runs from a temporary directory.
Slow (about a minute: the install), so it runs in CI (.ci/run) rather than in the default
suite; tests/test_layering.py checks the same rules on every run by reading the sources.
"""

import os
import shutil
import sys

import pytest

from tests.source_copy import ROOT, clean_copy, run
from tests.test_layering import OPTIONAL, library_modules


@pytest.mark.slow
def test_the_library_imports_and_runs_with_only_its_own_dependencies(tmp_path):
    source = clean_copy(tmp_path / "source")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", str(source)])

    installed = run([python, "-m", "pip", "list", "--format=freeze"]).lower()
    for application_only in ("ml-collections", "matplotlib", "scikit-learn", "tensorboard"):
        assert f"{application_only}==" not in installed, f"{application_only} came with bnjax"

    work = tmp_path / "work"  # nothing here is importable as bnjax
    work.mkdir()
    shutil.copy(ROOT / "tests" / "lean_smoke.py", work / "lean_smoke.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    modules = [m for m in library_modules() if m not in OPTIONAL]
    output = run([python, "lean_smoke.py", *modules], cwd=work, env=env)
    assert "BN, GN, fold, recalibrate ok" in output, output
