"""bnjax.export: round trips through StableHLO and ONNX, and the planted serving faults."""

import os

import numpy as np
import pytest

from bnjax import export, lifecycle
from bnjax.export import artifact
from tests.export.user_models import IMAGES, user_linen, user_nnx
from tests.lifecycle.helpers import DATA, initialised

RESNET_IMAGES = DATA.reshape(-1, 8, 8, 2)[:8]  # even sides: stride 2 down to 2x2


def _inputs(name):
    return RESNET_IMAGES if name == "resnet20" else IMAGES


def _folded(name):
    if name == "resnet20":
        model, variables = initialised("resnet20")  # kernels fit any image side
        return lifecycle.fold_model(
            model, variables, RESNET_IMAGES[:2], train=False
        ), RESNET_IMAGES[:4]
    if name == "user_linen":
        model, variables = user_linen()
        return lifecycle.fold_model(model, variables, IMAGES[:2], train=False), IMAGES[:4]
    return lifecycle.fold_model(user_nnx(), IMAGES[:2]), IMAGES[:4]


FORMATS = [
    "stablehlo",
    pytest.param(
        "onnx",
        marks=pytest.mark.skipif(
            not all(__import__("importlib").util.find_spec(p) for p in ("jax2onnx", "onnxruntime")),
            reason="ONNX export needs the optional extra: pip install 'bnjax[export]'",
        ),
    ),
]


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("name", ["resnet20", "user_linen", "user_nnx"])
def test_round_trip_equals_the_model_in_evaluation_mode(tmp_path, name, format):
    folded, calibration = _folded(name)
    path = str(tmp_path / name)
    report = export.export(folded, calibration, path, format=format)
    assert report.ok, report.format()
    manifest = export.read_manifest(path)
    assert manifest["input"]["shape"][0] == "b" and manifest["program"]["format"] == format
    assert set(manifest["fold"]["folded"]) | set(manifest["fold"]["affine"]) == set(
        manifest["statistics"]
    )
    # Reloaded without the model's code, on a batch size it was never traced for.
    served = export.load(path)(_inputs(name)[5:8])
    reference = np.asarray(folded.evaluate(_inputs(name)[5:8]))
    assert np.max(np.abs(served - reference)) <= 1e-4 * np.abs(reference).max()
    assert export.verify(path).ok


def test_training_mode_export_fails_batch_independence(tmp_path):
    model, variables = user_linen()

    def training_mode(x):  # the classic mistake: batch statistics in the served program
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    with pytest.raises(export.VerificationError, match="batch independence") as caught:
        export.export_function(training_mode, IMAGES[:4], str(tmp_path / "a"))
    assert "exported in training mode" in str(caught.value)
    assert not os.path.exists(tmp_path / "a")  # nothing left to serve


def test_a_wrong_fold_fails_the_output_check(tmp_path):
    folded, calibration = _folded("user_linen")

    def wrong(x):  # a fold that forgot one channel's gain shows as far-off outputs
        return folded(x) * np.array([1.0, 1.0, 1.0, 1.0, 1.05], np.float32)

    with pytest.raises(export.VerificationError, match="FAIL  outputs"):
        export.export_function(wrong, calibration, str(tmp_path / "a"), reference=folded.evaluate)


def _good(tmp_path):
    folded, calibration = _folded("user_linen")
    path = str(tmp_path / "good")
    export.export(folded, calibration, path)
    return path


def _rewrite_statistics(path, change):
    stored = artifact.read_statistics(path)
    change(stored)
    np.savez(os.path.join(path, artifact.STATISTICS), **stored)


def test_nan_stripped_or_changed_statistics_in_an_artifact_fail_verification(tmp_path):
    path = _good(tmp_path)

    def poison(stored):
        stored["entry_bn/var"] = np.where(np.arange(8) == 2, np.nan, stored["entry_bn/var"])

    _rewrite_statistics(path, poison)
    report = export.verify(path)
    assert not report.ok and "entry_bn: var non-finite in 1" in report.format()
    _rewrite_statistics(path, lambda stored: stored.pop("after_add/mean"))
    assert "after_add: running mean missing (stripped statistics)" in export.verify(path).format()


def test_a_tampered_program_or_a_non_artifact_is_unreadable(tmp_path):
    path = _good(tmp_path)
    with pytest.raises(export.ArtifactError, match="not a directory"):
        export.verify(str(tmp_path / "missing"))
    with open(os.path.join(path, "model.stablehlo"), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 64)
    with pytest.raises(export.ArtifactError, match="does not load"):
        export.verify(path)


def test_bad_arguments_name_the_fix(tmp_path):
    folded, calibration = _folded("user_nnx")
    with pytest.raises(ValueError, match="at least 2"):
        export.export(folded, calibration[:1], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="`format`"):
        export.export(folded, calibration, str(tmp_path / "a"), format="tflite")
    with pytest.raises(ValueError, match="`rtol`"):
        export.export(folded, calibration, str(tmp_path / "a"), rtol=2.0)
    os.makedirs(tmp_path / "exists")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export(folded, calibration, str(tmp_path / "exists"))
    with pytest.raises(TypeError, match="one array"):
        export.export_function(lambda x: (x, x), calibration, str(tmp_path / "b"))
