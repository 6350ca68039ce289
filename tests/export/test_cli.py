"""python -m bnjax.export: export a training workdir, verify artifacts; exit codes 0/1/2."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bnjax import data
from bnjax.checkpoints import Checkpointer
from bnjax.export import artifact
from bnjax.train import loop, steps
from bnjax.train import workdir as W
from tests.train.helpers import final_state, tiny_config

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


def _export_in_process(capsys, **values):
    """`python -m bnjax.export` with these flag values, in this process: (exit code, out, err)."""
    from bnjax.export import __main__ as command

    flags = {"format": "stablehlo", "step": None, "examples": 4, "rtol": 1e-4, "overwrite": False}
    try:
        code = command.export_command({**flags, **values})
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_out_that_is_or_holds_the_workdir_is_refused_and_nothing_is_deleted(workdir, capsys):
    before = sorted(os.listdir(workdir))
    for out in (workdir, os.path.join(workdir, "checkpoints"), os.path.dirname(workdir)):
        code, _, err = _export_in_process(capsys, workdir=workdir, out=out, overwrite=True)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert "workdir" in err and "--out" in err
        assert sorted(os.listdir(workdir)) == before
    result = _cli(f"--workdir={workdir}", f"--out={workdir}", "--overwrite", "--examples=2")
    assert result.returncode == 2 and sorted(os.listdir(workdir)) == before
    _, state = final_state(workdir)  # the checkpoint still restores
    assert "batch_stats" in state


def _copy_with_a_newer_step(workdir, directory):
    """A copy of `workdir` with step 5 (the same state) saved after step 3."""
    shutil.copytree(workdir, directory)
    with Checkpointer(os.path.join(directory, "checkpoints"), async_save=False) as checkpointer:
        checkpointer.save(5, checkpointer.restore(3), force=True)
    return os.path.join(directory, "checkpoints", "5")


def _truncate_the_largest_file(step_directory):
    files = [
        os.path.join(root, name) for root, _, names in os.walk(step_directory) for name in names
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:
        handle.truncate(os.path.getsize(largest) // 2)


def test_a_corrupt_newest_checkpoint_falls_back_with_a_note_or_fails_in_one_line(
    workdir, tmp_path, capsys
):
    copy = str(tmp_path / "run")
    _truncate_the_largest_file(_copy_with_a_newer_step(workdir, copy))
    code, out, err = _export_in_process(capsys, workdir=copy, out=str(tmp_path / "a"))
    assert code == 0, err
    assert "step 3 of" in out and "note: checkpoint step 5" in err and "Traceback" not in err
    code, _, err = _export_in_process(capsys, workdir=copy, out=str(tmp_path / "b"), step=5)
    assert code == 2 and len(err.splitlines()) == 1 and "step 5" in err, err

    copy = str(tmp_path / "no_manifest")
    step_directory = _copy_with_a_newer_step(workdir, copy)
    shutil.rmtree(os.path.join(step_directory, "manifest"))
    code, _, err = _export_in_process(capsys, workdir=copy, out=str(tmp_path / "c"), step=5)
    assert code == 2 and len(err.splitlines()) == 1 and "step 5" in err, err
    shutil.rmtree(os.path.join(copy, "checkpoints", "3", "manifest"))
    code, _, err = _export_in_process(capsys, workdir=copy, out=str(tmp_path / "d"))
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "no readable checkpoint" in last, err


@pytest.mark.parametrize("norm", ["none", "group"])
def test_a_workdir_without_batch_norm_exports_as_it_is(tmp_path, capsys, norm):
    directory = str(tmp_path / "run")
    config = tiny_config(model="small_cnn", dataset="clusters", norm=norm)
    test = data.load(config.dataset, "test", seed=config.seed)
    model = steps.make_model(**loop.model_settings(config, test.num_classes), for_training=False)
    _, optimizer = loop.schedule_and_optimizer(config)
    state = steps.initial_state(model, optimizer, test.images[:2], config.seed)
    W.save_config(config, directory)
    with Checkpointer(os.path.join(directory, "checkpoints"), async_save=False) as checkpointer:
        checkpointer.save(1, state, force=True)
    out = str(tmp_path / "artifact")
    code, printed, err = _export_in_process(capsys, workdir=directory, out=out)
    assert code == 0, err
    assert "no batch norm: nothing to fold" in printed and "verified" in printed
    manifest = artifact.read_manifest(out)
    assert manifest["fold"] == {"folded": {}, "affine": {}} and manifest["statistics"] == {}
