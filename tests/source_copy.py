"""A clean copy of this checkout (no virtual environment, build output or caches) and a
subprocess runner that fails with the command's output: shared by the install tests
(tests/test_wheel.py, tests/test_lean_install.py)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = (".venv", ".git", "site", "dist", "build", "*.egg-info", "__pycache__")
_NOT_SOURCE += (".pytest_cache", ".ruff_cache", "workdir")


def clean_copy(destination: Path) -> Path:
    """Copies the checkout's sources to `destination` and returns it."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    return destination


def run(command, **kwargs) -> str:
    """stdout of `command`; a non-zero exit fails the test with the end of its output."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{command} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result.stdout
