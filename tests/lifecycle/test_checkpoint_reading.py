"""Every read path of a checkpoint checks its checksums, or says loudly that it could not."""

import glob
import json
import os
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnjax import lifecycle
from bnjax.checkpoints import Checkpointer
from bnjax.lifecycle.__main__ import main
from bnjax.train import CorruptCheckpointError
from bnjax.train.loop import model_settings, schedule_and_optimizer
from bnjax.train.steps import initial_state, make_model
from tests.train.helpers import tiny_config


def _state(step):
    return {
        "step": np.int32(step),
        "params": {"w": np.arange(4096, dtype=np.float32) + step},
        "batch_stats": {"bn": {"mean": np.full(2, 0.5, np.float32), "var": np.ones(2)}},
        "opt_state": {"mu": np.zeros(3, np.float32)},
    }


def _flip_bytes(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:  # same size, other bytes: only the CRC32 sees it
        file.seek(os.path.getsize(largest) // 2)
        file.write(b"\x00\x01" * 8)


@pytest.fixture()
def workdir(tmp_path):
    """A workdir laid out as the training loop writes it: config.json, checkpoints 100 and 300
    (300 with flipped bytes)."""
    (tmp_path / "config.json").write_text(json.dumps({"norm": "batch"}))
    with Checkpointer(str(tmp_path / "checkpoints"), async_save=False) as checkpointer:
        for step in (100, 300):
            checkpointer.save(step, _state(step))
    _flip_bytes(tmp_path / "checkpoints" / "300")
    return tmp_path


# Every way to name step 300 of a workdir on the command line.
FORMS = {
    "workdir": lambda workdir: [str(workdir)],
    "checkpoints": lambda workdir: [f"{workdir}/checkpoints"],
    "checkpoints --step": lambda workdir: [f"{workdir}/checkpoints", "--step", "300"],
    "step": lambda workdir: [f"{workdir}/checkpoints/300"],
    "step/": lambda workdir: [f"{workdir}/checkpoints/300/"],
    "step/state": lambda workdir: [f"{workdir}/checkpoints/300/state"],
    "step/manifest": lambda workdir: [f"{workdir}/checkpoints/300/manifest"],
}


@pytest.mark.parametrize("form", FORMS)
def test_validate_checks_the_checksums_whatever_the_path(workdir, form, capsys):
    assert main(["validate", *FORMS[form](workdir)]) == 2  # step/state used to say OK
    err = capsys.readouterr().err
    assert f"step 300 of {workdir / 'checkpoints'} is corrupt" in err
    assert "'params/w' fails its checksum" in err
    assert sorted(os.listdir(workdir / "checkpoints")) == ["100", "300"]  # nothing moved


def test_load_checkpoint_checks_the_checksums_whatever_the_path(workdir):
    checkpoints = workdir / "checkpoints"
    for path in (workdir, checkpoints, checkpoints / "300", checkpoints / "300" / "state"):
        with pytest.raises(CorruptCheckpointError, match=r"step 300 .*'params/w' fails its"):
            lifecycle.load_checkpoint(str(path))  # used to restore the flipped bytes silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified read says nothing
        good = lifecycle.load_checkpoint(str(checkpoints / "100" / "state"))
        assert good["params"]["w"][0] == 100.0
        assert lifecycle.load_checkpoint(str(workdir), step=100)["step"] == 100
    # The explicit opt-out reads the bytes as they are.
    flipped = lifecycle.load_checkpoint(str(checkpoints / "300"), verify=False)
    assert not np.array_equal(flipped["params"]["w"], _state(300)["params"]["w"])


def test_a_step_without_its_manifest_is_refused_loudly(workdir, capsys):
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints / "100" / "manifest")
    for path in (checkpoints / "100", checkpoints / "100" / "state"):
        with pytest.raises(CorruptCheckpointError, match=r"step 100 .* no checksum manifest"):
            lifecycle.load_checkpoint(str(path))
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "no checksum manifest" in err and len(err.splitlines()) == 1
    assert lifecycle.load_checkpoint(str(checkpoints / "100"), verify=False)["step"] == 100
    # Without the step metadata that names the manifest either, the workdir still tells.
    os.remove(checkpoints / "100" / "_CHECKPOINT_METADATA")
    shutil.rmtree(checkpoints / "300")
    with pytest.raises(CorruptCheckpointError, match="no checksum manifest"):
        lifecycle.load_checkpoint(str(checkpoints / "100"))


def test_a_checkpoint_without_checksums_is_read_with_a_warning(tmp_path, capsys):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "plain"), _state(1))
    checkpointer.wait_until_finished()
    with pytest.warns(lifecycle.UnverifiedCheckpointWarning, match="has no checksums"):
        tree = lifecycle.load_checkpoint(str(tmp_path / "plain"))
    assert tree["params"]["w"][0] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lifecycle.load_checkpoint(str(tmp_path / "plain"), verify=False)
    assert main(["validate", str(tmp_path / "plain")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: ") and "has no checksums" in captured.err
    assert "OK" in captured.out


@pytest.fixture()
def group_norm_workdir(tmp_path):
    """A workdir of a model without batch norm (norm='group'): the training loop's state, its
    structure from the loop's own pieces, saved as the loop saves it (its values do not
    matter here, and tracing instead of running the initialisation saves seconds)."""
    config = tiny_config(norm="group")
    model = make_model(**model_settings(config, num_classes=10))
    _, optimizer = schedule_and_optimizer(config)
    images = np.zeros((2, 8, 8, 3), np.float32)
    shapes = jax.eval_shape(lambda: initial_state(model, optimizer, images, config.seed))
    state = jax.tree.map(lambda leaf: np.ones(leaf.shape, leaf.dtype), shapes)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with Checkpointer(str(tmp_path / "checkpoints"), async_save=False) as checkpointer:
        checkpointer.save(4, state)
    return str(tmp_path)


def test_validate_a_model_without_batch_norm(group_norm_workdir, capsys):
    assert main(["validate", group_norm_workdir]) == 0  # was 1: "the params alone?"
    out = capsys.readouterr().out
    assert "params alone" not in out
    assert "no batch-norm statistics to check" in out and out.rstrip().endswith("OK")
    tree = lifecycle.load_checkpoint(group_norm_workdir)
    report = lifecycle.validate_statistics(tree)
    assert report.ok and not report.layers and "no batch-norm statistics" in report.notes[0]
    # The same parameters saved alone are still refused: nothing says the model has no BN.
    assert not lifecycle.validate_statistics({"params": tree["params"]}).ok


def test_a_manifest_that_lists_other_leaves_names_them(workdir):
    manifest = workdir / "checkpoints" / "100" / "manifest" / "metadata"
    content = json.loads(manifest.read_text())
    content["leaves"]["params/b"] = content["leaves"].pop("params/w")
    manifest.write_text(json.dumps(content))
    pattern = r"'params/b' in the manifest, not restored; 'params/w' restored, not in the"
    with pytest.raises(CorruptCheckpointError, match=pattern):
        lifecycle.load_checkpoint(str(workdir), step=100)
