"""Lifecycle tools refuse to silently do nothing or produce garbage; validate checks checksums."""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax import lifecycle
from bnjax import nnx as bnnx
from bnjax.checkpoints import Checkpointer
from bnjax.lifecycle.__main__ import main
from tests.lifecycle.helpers import DATA, initialised

IMAGES = DATA[:8]


def _cnn():
    """A SmallCNN (batch norms 'norm0', 'norm1') with statistics away from their initial values."""
    return initialised("cnn")


def _train_step(apply_fn, variables):
    _, updates = apply_fn(variables, IMAGES, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


# ------------------------------------------------------------------ 1. layer selections

TYPO = r"'norm9' matched no batch-norm layer\. The batch-norm layers are: 'norm0', 'norm1'\."


@pytest.mark.parametrize(
    "call",
    [
        lambda m, v: lifecycle.reset_statistics(v, layers=["norm9"]),
        lambda m, v: lifecycle.bn_param_labels(v, layers=["norm0", "norm9"]),
        lambda m, v: lifecycle.freeze_optimizer(optax.sgd(0.1), v, layers="norm9"),
        lambda m, v: _train_step(lifecycle.freeze(m.apply, layers=("norm0", "norm9")), v),
    ],
    ids=["reset_statistics", "bn_param_labels", "freeze_optimizer", "freeze"],
)
def test_a_selector_that_matches_no_layer_is_an_error(call):
    model, variables = _cnn()
    with pytest.raises(ValueError, match=r"`layers`: " + TYPO):
        call(model, variables)


def test_frozen_statistics_checks_the_layers_it_saw_called():
    model, variables = _cnn()
    with pytest.raises(ValueError, match="'norm9' matched no batch-norm layer called"):
        with lifecycle.frozen_statistics(layers=["norm9"]):
            model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    # Only the layers' own paths select: a typo in one selector of several is still named.
    with pytest.raises(ValueError, match=r"`layers`: 'nrom1' matched no"):
        with lifecycle.frozen_statistics(layers=["norm0", "nrom1"]):
            model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])


def test_a_bare_string_is_one_path_not_its_characters():
    model, variables = _cnn()
    stats = _train_step(lifecycle.freeze(model.apply, layers="norm0"), variables)
    chex.assert_trees_all_equal(stats["norm0"], variables["batch_stats"]["norm0"])
    assert not np.allclose(stats["norm1"]["mean"], variables["batch_stats"]["norm1"]["mean"])
    reset = lifecycle.reset_statistics(variables, layers="norm1")
    np.testing.assert_array_equal(reset["batch_stats"]["norm1"]["var"], 1.0)
    chex.assert_trees_all_equal(reset["batch_stats"]["norm0"], variables["batch_stats"]["norm0"])
    labels = lifecycle.bn_param_labels(variables, layers="norm1")
    assert labels["norm1"]["scale"] == "frozen" and labels["norm0"]["scale"] == "trainable"


def test_predicates_empty_selections_and_bad_types():
    model, variables = _cnn()
    with pytest.raises(ValueError, match="`layers`: the predicate matched no batch-norm layer"):
        lifecycle.reset_statistics(variables, layers=lambda path: path[0] == "stem")
    with pytest.raises(ValueError, match="`layers` is empty"):
        lifecycle.freeze(model.apply, layers=[])
    with pytest.raises(TypeError, match="`layers` must be None, a predicate"):
        lifecycle.bn_param_labels(variables, layers=3)
    with pytest.raises(TypeError, match="`layers` holds 0"):
        lifecycle.reset_statistics(variables, layers=["norm0", 0])


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(2, 4, rngs=rngs)
        self.norm = bnnx.BatchNorm(4, rngs=rngs)
        self.renorm = bnnx.BatchRenorm(4, rngs=rngs)


def test_nnx_and_functional_selections():
    model = _NnxNet(nnx.Rngs(0))
    listing = r"The batch-norm layers are: 'norm', 'renorm'\."
    with pytest.raises(ValueError, match=r"'nrom' matched no batch-norm layer\. " + listing):
        lifecycle.freeze(model, layers=["nrom"])
    assert type(model.norm) is bnnx.BatchNorm  # nothing frozen on the way to the error
    with pytest.raises(ValueError, match="'dense' matched no"):
        lifecycle.trainable_filter(model, layers="dense")
    with pytest.raises(ValueError, match="'norm/mean' matched no"):
        lifecycle.reset_statistics(model, layers="norm/mean")
    lifecycle.freeze(model, layers="renorm")
    assert type(model.renorm).__name__ == "FrozenBatchRenorm" and type(model.norm) is bnnx.BatchNorm

    state = bnjax.BatchNormState(jnp.ones(2), jnp.full(2, 3.0), jnp.array(2), jnp.array(0))
    states = {"encoder": [state, state]}
    with pytest.raises(ValueError, match=r"'encoder/2' matched no .* 'encoder/0', 'encoder/1'"):
        lifecycle.reset_statistics(states, layers=["encoder/2"])
    reset = lifecycle.reset_statistics(states, layers="encoder/1")
    assert reset["encoder"][0].var.tolist() == [3.0, 3.0] and reset["encoder"][1].var.tolist() == [
        1.0,
        1.0,
    ]


# ------------------------------------------------------------------ 2. fold


def _with(variables, layer, **statistics):
    tree = jax.tree.map(np.array, variables)
    tree["batch_stats"][layer].update(statistics)
    return tree


@pytest.mark.parametrize(
    "change, message",
    [
        ({"var": np.array([1.0, -0.5, 1.0, 1.0])}, r"'norm0': negative var in 1 channel\(s\)"),
        ({"mean": np.array([np.nan, 0.0, 0.0, 0.0])}, r"'norm0': mean non-finite in 1 channel"),
        ({"var": np.full(4, np.inf)}, r"'norm0': var non-finite in 4 channel"),
    ],
)
def test_fold_refuses_bad_statistics(change, message):
    _, variables = _cnn()
    with pytest.raises(ValueError, match=r"batch norm " + message):
        lifecycle.fold(_with(variables, "norm0", **change))


def test_fold_refuses_bad_epsilons():
    _, variables = _cnn()
    with pytest.raises(ValueError, match=r"'norm0': epsilon is -0\.001 \(it must be finite"):
        lifecycle.fold(variables, epsilon=-1e-3)
    with pytest.raises(ValueError, match=r"'norm1': epsilon is nan"):
        lifecycle.fold(variables, epsilon={"norm0": 1e-5, "norm1": float("nan")})
    zero_var = _with(variables, "norm1", var=np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"'norm1': var \+ epsilon is 0 in 1 channel"):
        lifecycle.fold(zero_var, epsilon=0.0)
    lifecycle.fold(zero_var, epsilon=1e-5)  # a zero variance is fine with an epsilon
    with pytest.raises(ValueError, match="fold_into: negative var"):
        lifecycle.fold_into(jnp.ones((2, 1)), None, jnp.zeros(1), -jnp.ones(1))
    # Under jit the values are unknown: nothing to check, and the fold still compiles.
    kernel, _ = jax.jit(lifecycle.fold_into)(jnp.ones((2, 1)), None, jnp.zeros(1), jnp.ones(1))
    assert kernel.shape == (2, 1)


# ------------------------------------------------------------------ 3. recalibrate


def _layer_inputs(states, batch, training):
    return {"bn": batch}


X = np.asarray(DATA.reshape(-1, 4)[:32])


@pytest.mark.parametrize("features", [3, 1])  # (1,) used to broadcast silently
def test_recalibrate_refuses_states_of_the_wrong_shape(features):
    states = {"bn": bnjax.batch_norm_state(features)}
    pattern = rf"`states`: the statistics of the state at 'bn' have the wrong shape \(mean \({features},\), var \({features},\)\): .* features of shape \(4,\)"  # noqa: E501
    with pytest.raises(ValueError, match=pattern):
        lifecycle.recalibrate_states(_layer_inputs, states, [X[:16], X[16:]])
    model, variables = _cnn()
    bad = _with(variables, "norm1", mean=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"mean.* \(5,\)"):  # the module's own check says it
        lifecycle.recalibrate(model, bad, [IMAGES], apply_kwargs={"train": False})


@pytest.mark.parametrize(
    "num_batches, error, message",
    [
        (-1, ValueError, "must be >= 1"),
        (0, ValueError, "must be >= 1"),
        (1.0, TypeError, "got float 1.0"),
        (True, TypeError, "got bool True"),
        ("2", TypeError, "got str"),
    ],
)
def test_recalibrate_names_a_bad_num_batches(num_batches, error, message):
    states = {"bn": bnjax.batch_norm_state(4)}
    with pytest.raises(error, match=f"`num_batches`.*{message}"):
        lifecycle.recalibrate_states(
            _layer_inputs, states, [X[:16], X[16:]], num_batches=num_batches
        )
    with pytest.raises(TypeError, match="`batches` must be an iterable"):
        lifecycle.recalibrate_states(_layer_inputs, states, 3)
    one = lifecycle.recalibrate_states(
        _layer_inputs, states, [X[:16], X[16:]], num_batches=np.int64(1)
    )
    assert int(one["bn"].count) == 1


# ------------------------------------------------------------------ 4. validate


def _state(step):
    return {
        "params": {"w": np.arange(4096, dtype=np.float32) + step},
        "batch_stats": {
            "bn": {
                "mean": np.full(2, 0.5, np.float32),
                "var": np.ones(2),
                "count": np.int32(step),  # kept by a norm built with track_counters=True
                "skipped": np.int32(0),
            }
        },
    }


def _flip_bytes(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:  # same size, other bytes: only the CRC32 sees it
        file.seek(os.path.getsize(largest) // 2)
        file.write(b"\x00\x01" * 8)


def test_validate_a_workdir_with_checksums(tmp_path, capsys):
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with Checkpointer(str(checkpoints), async_save=False) as checkpointer:
        for step in (100, 200):
            checkpointer.save(step, _state(step))
    assert main(["validate", str(workdir)]) == 0  # WORKDIR/checkpoints is found
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"step 200 of {checkpoints}" and "OK" in out

    _flip_bytes(checkpoints / "200")
    assert main(["validate", str(workdir)]) == 2  # was 0: flipped bytes passed as OK
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == (
        f"step 100 of {checkpoints} (newest readable step; step(s) [200] corrupt)"
    )
    assert f"step 200 of {checkpoints} is corrupt" in captured.err
    assert "'params/w' fails its checksum" in captured.err

    assert main(["validate", str(checkpoints), "--step", "200"]) == 2
    assert "fails its checksum" in capsys.readouterr().err
    assert main(["validate", str(checkpoints / "100")]) == 0  # a step directory
    assert capsys.readouterr().out.startswith(f"step 100 of {checkpoints}\n")
    assert main(["validate", str(checkpoints / "100"), "--step", "200"]) == 2
    assert "conflicts" in capsys.readouterr().err
    assert sorted(os.listdir(checkpoints)) == ["100", "200"]  # read-only: nothing moved


# ------------------------------------------------------------------ 5. inputs of the wrong type


@pytest.mark.parametrize("target", [42, None, "variables", np.ones(3)], ids=repr)
def test_reset_statistics_refuses_what_holds_no_batch_norm(target):
    with pytest.raises(TypeError, match=r"`target` must be linen variables .* got "):
        lifecycle.reset_statistics(target)  # 42 used to come back as 42


def test_fold_into_takes_a_list_kernel_as_an_array():
    statistics = dict(mean=jnp.array([1.0]), var=jnp.array([4.0]), epsilon=0.0)
    kernel, bias = lifecycle.fold_into([[1.0], [1.0]], None, **statistics)  # was AttributeError
    expected_kernel, expected_bias = lifecycle.fold_into(jnp.ones((2, 1)), None, **statistics)
    chex.assert_trees_all_equal((kernel, bias), (expected_kernel, expected_bias))
    with pytest.raises(TypeError, match=r"`kernel` has dtype int32: .* a floating kernel"):
        lifecycle.fold_into([[1], [1]], None, **statistics)  # folded, it would be rounded


def test_validate_statistics_reads_lists_as_arrays():
    as_lists = {"batch_stats": {"bn": {"mean": [0.5, 0.5], "var": [1.0, 2.0]}}}
    report = lifecycle.validate_statistics(as_lists)  # was "no batch-norm statistics found"
    assert report.ok and report.layers[0].features == (2,)
    negative = {"bn": {"mean": [0.5, 0.5], "var": (1.0, -2.0)}}
    report = lifecycle.validate_statistics(negative)
    assert report.layers[0].problems == ("negative var in 1 channel(s) (min -2)",)
    integers = lifecycle.validate_statistics({"bn": {"mean": [0, 0], "var": [1, 1]}})
    assert integers.layers[0].problems[0] == "mean has dtype int64, not floating"
    # A list of layers is still a list of layers, not an array.
    states = [bnjax.BatchNormState(jnp.ones(2), jnp.ones(2), jnp.array(1), jnp.array(0))] * 2
    assert [layer.path for layer in lifecycle.validate_statistics(states).layers] == ["0", "1"]
