"""validate_statistics and the CLI: every planted defect is flagged, a good tree passes."""

import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import bnjax
from bnjax import lifecycle
from bnjax import nnx as bnnx
from bnjax.lifecycle.__main__ import main
from tests.lifecycle.helpers import DATA, initialised

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _good(counters=True):
    """A trained-looking ResNet tree; with `counters` its norms keep count/skipped."""
    return copy.deepcopy(jax.tree.map(np.asarray, initialised("resnet", counters=counters)[1]))


def _problems(tree, **kwargs):
    report = lifecycle.validate_statistics(tree, **kwargs)
    return {layer.path: layer.problems for layer in report.layers if layer.problems}, report


def test_count_0_with_trained_statistics_is_a_note_not_a_problem():
    tree = _good()
    tree["batch_stats"]["stage1_block0"]["norm1"]["count"] = np.zeros((), np.int32)
    problems, report = _problems(tree)
    assert report.ok and not problems
    (layer,) = [entry for entry in report.layers if entry.notes]
    assert layer.notes[0] == "count 0 but the statistics moved from their initial values"


def test_a_good_tree_passes():
    problems, report = _problems(_good())
    assert report.ok and not problems and not report.problems
    assert len(report.layers) == 6  # stem, 2 x (norm1, norm2), the second block's shortcut
    assert "6 batch-norm layer(s), 0 with problems: OK" in report.format()
    assert {layer.count for layer in report.layers} == {1}  # read from 'batch_stats'


def _plant(tree, defect):
    stats = tree["batch_stats"]
    layer = stats["stage1_block0"]["norm1"]
    if defect == "missing var":
        del layer["var"]
    elif defect == "non-finite":
        layer["mean"][1] = np.nan
        layer["var"][2] = np.inf
    elif defect == "negative var":
        layer["var"][0] = -0.5
    elif defect == "count 0":
        layer["count"] = np.zeros((), np.int32)
        layer["mean"] = np.zeros_like(layer["mean"])
        layer["var"] = np.ones_like(layer["var"])
    elif defect == "var shape":
        layer["var"] = np.ones(5, np.float32)
    elif defect == "scale shape":
        tree["params"]["stage1_block0"]["norm1"]["scale"] = np.ones(3, np.float32)
    elif defect == "integer":
        layer["mean"] = layer["mean"].astype(np.int32)
    return tree


@pytest.mark.parametrize(
    "defect, message",
    [
        ("missing var", "missing var"),
        ("non-finite", "mean non-finite in 1 channel(s)"),
        ("negative var", "negative var in 1 channel(s)"),
        ("count 0", "never updated (count 0)"),
        ("var shape", "var shape (5,) != (8,)"),
        ("scale shape", "scale shape (3,) != statistics (8,)"),
        ("integer", "mean has dtype int32"),
    ],
)
def test_each_planted_defect_is_flagged(defect, message):
    problems, report = _problems(_plant(_good(), defect))
    assert not report.ok
    assert list(problems) == ["stage1_block0/norm1"]
    assert any(message in problem for problem in problems["stage1_block0/norm1"]), problems
    assert "FAIL" in report.format(only_problems=True)


def test_statistics_that_were_never_updated_without_counters():
    tree = _good(counters=False)  # flax's variables (the default): no counters
    assert "count" not in tree["batch_stats"]["stem_norm"]
    report = lifecycle.validate_statistics(tree)
    assert report.ok and {layer.count for layer in report.layers} == {None}
    tree["batch_stats"]["stem_norm"] = {"mean": np.zeros(4, np.float32), "var": np.ones(4)}
    problems, _ = _problems(tree)
    assert "initial values" in problems["stem_norm"][0]


def test_against_the_model_and_the_params_only_checkpoint():
    model, variables = initialised("resnet", counters=True)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), DATA[:2], train=False))
    tree = _good()
    del tree["batch_stats"]["stage0_block0"]["norm2"]
    tree["batch_stats"]["stem_norm"] = {"mean": np.ones(5), "var": np.ones(5)}
    problems, report = _problems(tree, expected=expected)
    assert problems["stage0_block0/norm2"] == ("missing",)
    assert any("the model's (4,)" in p for p in problems["stem_norm"])
    _, report = _problems({"params": variables["params"]})
    assert not report.ok and "no batch-norm statistics" in report.problems[0]


def test_functional_states_nnx_models_and_notes():
    state = bnjax.BatchNormState(
        jnp.zeros(3), jnp.array([1.0, 0.0, 2.0]), jnp.array(4), jnp.array(2)
    )
    report = lifecycle.validate_statistics({"encoder": [state]})
    assert report.ok and report.layers[0].path == "encoder/0"
    assert report.layers[0].notes == ("var 0 in 1 channel(s)", "2 non-finite batch(es) skipped")

    class Net(nnx.Module):
        def __init__(self, track_counters):
            self.norm = bnnx.BatchNorm(2, track_counters=track_counters, rngs=nnx.Rngs(0))

    model = Net(track_counters=True)
    _, report = _problems(model)
    assert report.layers[0].problems == ("never updated (count 0)",)
    model.norm(DATA.reshape(-1, 2)[:8])
    report = lifecycle.validate_statistics(model)
    assert report.ok and report.layers[0].count == 1

    model = Net(track_counters=False)  # flax's variables: judged by the initial values
    _, report = _problems(model)
    assert "initial values" in report.layers[0].problems[0]
    model.norm(DATA.reshape(-1, 2)[:8])
    report = lifecycle.validate_statistics(model)
    assert report.ok and report.layers[0].count is None


def _save(directory, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()


def test_cli_on_orbax_checkpoints(tmp_path, capsys):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    _save(good, _good())
    _save(bad, _plant(_good(), "negative var"))
    # The real command line once, in a fresh interpreter.
    result = subprocess.run(
        [sys.executable, "-m", "bnjax.lifecycle", "validate", bad],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "stage1_block0/norm1" in result.stdout and "negative var" in result.stdout
    # The same entry point in process for the other exit statuses.
    assert main(["validate", good]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["validate", bad, "--quiet"]) == 1
    assert "stem_norm" not in capsys.readouterr().out


def test_checkpoint_manager_layouts(tmp_path, capsys):
    manager = ocp.CheckpointManager(str(tmp_path / "run"), item_names=("state", "config"))
    for step, tree in ((1, _plant(_good(), "count 0")), (2, _good())):
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), config=ocp.args.JsonSave({"lr": 0.1})
            ),
        )
    manager.wait_until_finished()
    assert main(["validate", str(tmp_path / "run")]) == 0  # the latest step
    assert main(["validate", str(tmp_path / "run"), "--step", "1"]) == 1
    restored = lifecycle.load_checkpoint(str(tmp_path / "run" / "2"))
    assert "batch_stats" in restored  # the one PyTree item (the JSON config is not one)
    assert main(["validate", str(tmp_path / "run"), "--step", "9"]) == 2
    capsys.readouterr()
