"""notebooks/colab_tpu.ipynb runs top to bottom in its small setting and reports sane numbers.

nbclient executes it in a fresh Jupyter kernel running this interpreter (from a kernelspec
written for the test, so no user-level `python3` kernelspec can swap in another Python); the
kernel imports this checkout's bnjax, so the notebook skips its pip install (the install cell's
search for a clone or a wheel is tested on its own below). The kernel's
environment selects the small setting (BNJAX_NOTEBOOK_SMALL=1, read by the parameters cell),
JAX_PLATFORMS=cpu, ipykernel's inline matplotlib backend, and 8 virtual CPU devices (as
tests/conftest.py sets for this process): the training step really shards every batch over
8 devices, as on an 8-core TPU. The last cell prints `RESULT {json}`, parsed here.
"""

import json
import math
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
DEVICE_FLAG = "--xla_force_host_platform_device_count"
KERNEL_NAME = "bnjax-notebook-test"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ, BNJAX_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu")
    env.pop("MPLBACKEND", None)  # ipykernel's default: inline figures, as in Colab
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}=8"])
    # The kernel must import this checkout's bnjax whatever the install mode.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _stdout(cell) -> str:
    return "".join(
        output.get("text", "")
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == "stdout"
    )


def test_notebook_is_saved_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "BNJAX_NOTEBOOK_SMALL" in tagged[0].source


def test_notebook_runs_in_the_small_setting(tmp_path, monkeypatch):
    # A kernelspec running sys.executable (ipykernel's own python3 spec, under our name).
    kernelspec.write_kernel_spec(tmp_path / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=300,  # per cell; the whole small run takes well under a minute
        startup_timeout=120,  # a loaded CI machine can be slow to start the kernel
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell

    lines = [
        line
        for cell in notebook.cells
        if cell.cell_type == "code"
        for line in _stdout(cell).splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(lines) == 1, "the notebook must print exactly one RESULT line"
    result = json.loads(lines[0].removeprefix("RESULT "))

    assert result["backend"] == "cpu"
    assert result["num_devices"] == 8
    assert result["batch_size"] % result["num_devices"] == 0
    assert result["model"] == "cnn" and len(result["features"]) >= 2
    assert result["num_steps"] < 100, "the small setting was not selected"
    assert math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    for key in ("accuracy_running_stats", "accuracy_batch_stats", "accuracy_recalibrated"):
        value = result[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    # Recalibration replaced the running statistics with those of the uniform batches.
    assert math.isfinite(result["statistics_change"]) and result["statistics_change"] > 0
    # The plot cell drew its figure.
    assert any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ), "no figure in the outputs"


def _install_cell() -> str:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [
        c for c in notebook.cells if c.cell_type == "code" and "def bnjax_source" in c.source
    ]
    return cell.source


def test_install_cell_finds_a_clone_or_a_wheel_without_editing(tmp_path, monkeypatch):
    """The install cell needs no edit: it finds a clone at, above or below the working
    directory, else the newest wheel next to it; BNJAX_SOURCE overrides both."""
    namespace = {}
    exec(_install_cell(), namespace)  # bnjax is importable here: the cell installs nothing
    find = namespace["bnjax_source"]

    assert find(tmp_path) is None  # nothing there: the cell raises, naming the three ways
    clone = tmp_path / "bnjax"
    (clone / "notebooks").mkdir(parents=True)
    (clone / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    assert find(clone / "notebooks") == [str(clone)]  # opened from the clone's notebooks/
    assert find(tmp_path) == [str(clone)]  # `git clone` into the working directory

    elsewhere = tmp_path / "content"
    (elsewhere / "dist").mkdir(parents=True)
    older = elsewhere / "dist" / "bnjax-0.1.0-py3-none-any.whl"
    newer = elsewhere / "bnjax-0.2.0-py3-none-any.whl"
    older.write_bytes(b"")
    newer.write_bytes(b"")
    os.utime(older, (1, 1))
    assert find(elsewhere) == [str(newer)]

    namespace["BNJAX_SOURCE"] = "git+https://example.org/bnjax.git"
    assert find(elsewhere) == ["git+https://example.org/bnjax.git"]
