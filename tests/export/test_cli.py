"""python -m bnjax.export: export a training workdir, verify artifacts; exit codes 0/1/2."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bnjax import data
from bnjax.export import artifact
from bnjax.train import loop, steps
from bnjax.train import workdir as W
from bnjax.train.checkpoints import Checkpointer
from tests.train.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    environment = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "bnjax.export", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scripts/train.py workdir (config.json + one checkpoint) of a SmallCNN, untrained."""
    directory = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(model="small_cnn", dataset="clusters")
    test = data.load(config.dataset, "test", seed=config.seed)
    model = steps.make_model(**loop.model_settings(config, test.num_classes), for_training=False)
    _, optimizer = loop.schedule_and_optimizer(config)
    state = steps.initial_state(model, optimizer, test.images[:2], config.seed)
    rng = np.random.default_rng(0)  # statistics as after training, so the fold matters
    state["batch_stats"] = {
        layer: {
            "mean": rng.normal(size=s["mean"].shape),
            "var": rng.uniform(0.5, 2, s["var"].shape),
        }
        for layer, s in state["batch_stats"].items()
    }
    W.save_config(config, directory)
    with Checkpointer(os.path.join(directory, "checkpoints"), async_save=False) as checkpointer:
        checkpointer.save(3, state, force=True)
    return directory


def test_export_a_workdir_then_verify_it(workdir, tmp_path):
    out = str(tmp_path / "artifact")
    result = _cli(f"--workdir={workdir}", "--format=stablehlo", f"--out={out}", "--examples=4")
    assert result.returncode == 0, result.stderr
    assert "norm0 <- conv0 (folded)" in result.stdout and "verified" in result.stdout
    manifest = artifact.read_manifest(out)
    assert manifest["source"]["step"] == 3 and manifest["calibration"]["examples"] == 4
    result = _cli("verify", out)
    assert result.returncode == 0 and "verified: all 4 check(s) passed" in result.stdout

    stored = artifact.read_statistics(out)
    stored["norm1/mean"] = stored["norm1/mean"] + 1.0  # changed after export
    np.savez(os.path.join(out, artifact.STATISTICS), **stored)
    result = _cli("verify", out)
    assert result.returncode == 1
    assert "norm1: mean differs from its checksum at export" in result.stdout


def test_usage_and_unreadable_inputs_exit_2(tmp_path):
    result = _cli("verify", str(tmp_path))
    assert result.returncode == 2 and "cannot read artifact" in result.stderr
    result = _cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'a'}")
    assert result.returncode == 2 and "no config.json" in result.stderr
    assert _cli("--format=tflite").returncode == 2
    assert _cli("verify").returncode == 2
