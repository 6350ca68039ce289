"""What export may delete, and what verify may trust: only its own artifact, and nothing the
verified files say about themselves (their tolerance, their paths, their own checksums)."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import export
from bnjax.export import artifact

BATCH = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)


def _double(x):
    return 2.0 * x


def _artifact(tmp_path, name="double", fn=_double, **options):
    path = str(tmp_path / name)
    export.export_function(fn, BATCH, path, **options)
    return path


def _edit_manifest(path, change):
    with open(os.path.join(path, artifact.MANIFEST)) as handle:
        manifest = json.load(handle)
    change(manifest)
    with open(os.path.join(path, artifact.MANIFEST), "w") as handle:
        json.dump(manifest, handle)


def _a_run(directory):
    """A directory with a training run's files in it (not an artifact)."""
    os.makedirs(os.path.join(directory, "checkpoints", "3"))
    for name in ("config.json", "metrics.jsonl", os.path.join("checkpoints", "3", "state")):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write("{}\n")
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- overwrite


def test_overwrite_never_deletes_a_directory_that_is_not_an_artifact(tmp_path):
    run = str(tmp_path / "runs" / "cnn")
    files = _a_run(run)
    for out in (run, os.path.join(run, "checkpoints"), str(tmp_path / "runs")):
        with pytest.raises(FileExistsError, match="not a bnjax serving artifact"):
            export.export_function(_double, BATCH, out, overwrite=True)
        assert sorted(os.listdir(run)) == files
    with open(tmp_path / "a_file", "w") as handle:
        handle.write("keep me")
    with pytest.raises(FileExistsError, match="not a directory"):
        export.export_function(_double, BATCH, str(tmp_path / "a_file"), overwrite=True)
    assert open(tmp_path / "a_file").read() == "keep me"
    assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]


def test_overwrite_replaces_an_artifact_but_not_the_files_a_user_added_to_it(tmp_path):
    path = _artifact(tmp_path)
    export.export_function(lambda x: 3.0 * x, BATCH, path, overwrite=True)  # replaced
    np.testing.assert_allclose(export.load(path)(BATCH), 3.0 * BATCH)
    with open(os.path.join(path, "notes.txt"), "w") as handle:
        handle.write("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        export.export_function(_double, BATCH, path, overwrite=True)
    assert open(os.path.join(path, "notes.txt")).read() == "mine"
    np.testing.assert_allclose(export.load(path)(BATCH), 3.0 * BATCH)  # left as it was


# --------------------------------------------------------------------------- verify's trust


def test_a_loosened_tolerance_and_a_swapped_program_are_not_verified(tmp_path):
    path = _artifact(tmp_path)
    other = _artifact(tmp_path, "other", fn=lambda x: 2.16 * x)  # outputs 8% off
    shutil.copy(os.path.join(other, "model.stablehlo"), os.path.join(path, "model.stablehlo"))
    _edit_manifest(path, lambda manifest: manifest["calibration"].update(rtol=0.5))
    report = export.verify(path)
    assert not report.ok
    text = report.format()
    assert "FAIL  integrity" in text and "model.stablehlo" in text and "manifest.json" in text
    assert "FAIL  outputs" in text and "rtol 0.0001" in text and "states rtol 0.5" in text
    # A looser tolerance is the caller's explicit choice, never the file's; the checksums
    # still hold the swap.
    report = export.verify(path, rtol=0.5)
    assert not report.ok and [c.name for c in report.checks if not c.ok] == ["integrity"]


def test_an_export_with_a_looser_tolerance_verifies_when_the_caller_says_so(tmp_path):
    path = _artifact(tmp_path, rtol=1e-3)
    assert export.read_manifest(path)["calibration"]["rtol"] == 1e-3
    assert "(rtol 0.001)" in export.verify(path, rtol=1e-3).format()
    report = export.verify(path)  # checked at the ceiling: exact outputs pass it
    assert report.ok and "rtol 0.0001" in report.format()


def test_changed_files_fail_their_checksums(tmp_path):
    path = _artifact(tmp_path)
    outputs = np.load(os.path.join(path, artifact.OUTPUTS))
    np.save(os.path.join(path, artifact.OUTPUTS), outputs * 1.01)  # a reference that agrees
    report = export.verify(path)
    assert not report.ok and "calibration_outputs.npy changed since export" in report.format()
    path = _artifact(tmp_path, "edited")
    _edit_manifest(path, lambda manifest: manifest["source"].update(step=7))
    assert "manifest.json changed since export" in export.verify(path).format()
    path = _artifact(tmp_path, "stripped")
    _edit_manifest(path, lambda manifest: manifest.pop("checksum"))
    assert "no checksum" in export.verify(path).format()


def test_verify_reads_no_file_outside_the_artifact(tmp_path):
    path = _artifact(tmp_path)
    outside = _artifact(tmp_path, "other")
    for name in ("../other/model.stablehlo", os.path.join(outside, "model.stablehlo")):
        _edit_manifest(path, lambda manifest, name=name: manifest["program"].update(file=name))
        with pytest.raises(export.ArtifactError, match="outside the artifact"):
            export.verify(path)
        with pytest.raises(export.ArtifactError, match="outside the artifact"):
            export.load(path)
    _edit_manifest(path, lambda manifest: manifest["program"].update(file="model.stablehlo"))
    _edit_manifest(path, lambda manifest: manifest["calibration"].update(inputs="../x.npy"))
    with pytest.raises(export.ArtifactError, match="outside the artifact"):
        export.verify(path)
    path = _artifact(tmp_path, "linked")
    os.remove(os.path.join(path, "model.stablehlo"))
    os.symlink(os.path.join(outside, "model.stablehlo"), os.path.join(path, "model.stablehlo"))
    with pytest.raises(export.ArtifactError, match="outside the artifact"):
        export.verify(path)


def test_a_calibration_batch_of_one_checks_no_batch_independence(tmp_path):
    path = _artifact(tmp_path)
    for name in (artifact.INPUTS, artifact.OUTPUTS):
        np.save(os.path.join(path, name), np.load(os.path.join(path, name))[:1])
    report = export.verify(path)
    failed = {check.name: check.detail for check in report.checks if not check.ok}
    assert "at least 2" in failed["batch independence"]


def test_a_tolerance_below_float32_precision_is_named_as_such(tmp_path):
    def rounding_level(x):  # batch dependent at 1e-7 of the outputs: float32 rounding
        return x + 2e-7 * jnp.mean(x, axis=0)

    _artifact(tmp_path, "ok", fn=rounding_level)  # the default tolerance passes it
    with pytest.raises(export.VerificationError) as caught:
        _artifact(tmp_path, "tight", fn=rounding_level, rtol=1e-12)
    text = str(caught.value)
    assert "below float32 precision" in text and "training mode" not in text
