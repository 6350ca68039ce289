"""Averaged models: EMA / SWA against float64 NumPy, and statistics that belong to the average."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bnjax import lifecycle
from bnjax import nnx as bnnx
from tests.lifecycle.helpers import BATCHES, initialised

EPS = 1e-5


def _snapshots(variables, count: int, seed: int = 0):
    """`count` perturbed copies of `variables` (floats moved, counters stepped), as a run's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        out.append(
            jax.tree.map(
                lambda a, i=i: (
                    jnp.asarray(np.asarray(a) + rng.normal(size=a.shape) * 0.3, a.dtype)
                    if jnp.issubdtype(a.dtype, jnp.floating)
                    else a + i + 1
                ),
                variables,
            )
        )
    return out


def _floats64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _ema_reference(start, snapshots, decay, warmup):
    """Float64 EMA: avg = d_t avg + (1 - d_t) w_t, d_t = min(d, (1 + t) / (10 + t))."""
    average = _floats64(start)
    for t, snapshot in enumerate(snapshots):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = jax.tree.map(lambda a, w, d=d: d * a + (1 - d) * w, average, _floats64(snapshot))
    return average


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_float64_recurrence_and_keeps_the_latest_counters(warmup):
    _, variables = initialised("mlp", counters=True)
    snapshots = _snapshots(variables, 5)
    averager = lifecycle.ema(0.8, warmup=warmup)
    average = averager.init(variables)
    update = jax.jit(averager.update)
    for snapshot in snapshots:
        average = update(average, snapshot)
    want = _ema_reference(variables, snapshots, 0.8, warmup)
    chex.assert_trees_all_close(_floats64(average.params), want["params"], rtol=1e-6, atol=1e-6)
    for layer in ("norm0", "norm1"):
        got, ref = average.batch_stats[layer], want["batch_stats"][layer]
        np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-6)
        # Counters are not averaged: the latest snapshot's values, dtype kept.
        assert got["count"].dtype == variables["batch_stats"][layer]["count"].dtype
        chex.assert_trees_all_equal(got["count"], snapshots[-1]["batch_stats"][layer]["count"])
    assert int(average.count) == int(average.step) == 5
    chex.assert_trees_all_equal_dtypes(average.params, variables["params"])


def test_swa_is_the_mean_of_every_kth_snapshot():
    _, variables = initialised("mlp")
    snapshots = _snapshots(variables, 7, seed=1)
    averager = lifecycle.swa(every=3)
    average = averager.init(variables)
    update = jax.jit(averager.update)
    for snapshot in snapshots:
        average = update(average, snapshot)
    taken = [_floats64(snapshots[i]) for i in (2, 5)]  # the 3rd and the 6th update
    want = jax.tree.map(lambda *leaves: np.mean(leaves, axis=0), *taken)
    chex.assert_trees_all_close(_floats64(average.params), want["params"], rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(
        _floats64(average.batch_stats), want["batch_stats"], rtol=1e-6, atol=1e-6
    )
    assert (int(average.count), int(average.step)) == (2, 7)
    # every=1 after one update: exactly that snapshot (the initial copy is replaced).
    one = lifecycle.swa().update(lifecycle.swa().init(variables), snapshots[0])
    chex.assert_trees_all_equal(one.params, snapshots[0]["params"])


def _mlp_train_mode_inputs(params, batches):
    """Float64 inputs of the MLP's two batch norms, each normalizing with its batch's
    statistics (training mode, what recalibrate's mode='train' measures)."""
    params = _floats64(params)
    inputs = [[], []]
    for batch in batches:
        h = np.asarray(batch, np.float64).reshape(len(batch), -1)
        for i in range(2):
            h = h @ params[f"dense{i}"]["kernel"]
            inputs[i].append(h)
            h = (h - h.mean(0)) / np.sqrt(h.var(0) + EPS) * params[f"norm{i}"]["scale"]
            h = np.maximum(h + params[f"norm{i}"]["bias"], 0.0)
    return [np.concatenate(values) for values in inputs]


def test_recalibrated_ema_holds_the_exact_population_statistics_of_the_averaged_model():
    model, variables = initialised("mlp", counters=True)
    averager = lifecycle.ema(0.7)
    average = averager.init(variables)
    for snapshot in _snapshots(variables, 4, seed=2):
        average = averager.update(average, snapshot)
    fresh = lifecycle.averaged_variables(model, average, statistics="recalibrate", batches=BATCHES)
    chex.assert_trees_all_equal(fresh["params"], average.params)
    for i, values in enumerate(_mlp_train_mode_inputs(average.params, BATCHES)):
        layer = fresh["batch_stats"][f"norm{i}"]
        mean, var = values.mean(0), values.var(0)
        np.testing.assert_allclose(layer["mean"], mean, rtol=2e-5, atol=2e-5 * np.abs(mean).max())
        np.testing.assert_allclose(layer["var"], var, rtol=2e-5)
        assert int(layer["count"]) == len(BATCHES)
    # Averaged statistics are the other choice: the average's own batch_stats, untouched.
    averaged = lifecycle.averaged_variables(model, average)
    chex.assert_trees_all_equal(averaged["batch_stats"], average.batch_stats)


def test_full_batch_recalibration_of_the_average_equals_training_mode_on_all_the_data():
    model, variables = initialised("mlp")
    average = lifecycle.swa().init(variables)
    fresh = lifecycle.averaged_variables(
        model, average, statistics="recalibrate", batches=BATCHES, mode="full_batch"
    )
    data = np.concatenate(BATCHES)
    for i, values in enumerate(_mlp_train_mode_inputs(average.params, [data])):
        np.testing.assert_allclose(
            fresh["batch_stats"][f"norm{i}"]["var"], values.var(0), rtol=1e-4
        )


def test_averaged_statistics_belong_to_none_of_the_averaged_weights():
    """Two snapshots whose statistics are exact for their own weights, first kernel K and 3K:
    the SWA model's first kernel is 2K, its first norm's input variance 4 var(xK), but the
    averaged statistics say (1 + 9) / 2 = 5 var(xK). Recalibration gives the 4."""
    model, variables = initialised("mlp")
    data = np.concatenate(BATCHES)

    def exact(params):
        stats = _mlp_train_mode_inputs(params, BATCHES)
        return {f"norm{i}": {"mean": v.mean(0), "var": v.var(0)} for i, v in enumerate(stats)}

    snapshots = []
    for factor in (1.0, 3.0):
        params = jax.tree.map(jnp.asarray, variables["params"])
        params["dense0"]["kernel"] = params["dense0"]["kernel"] * factor
        stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), exact(params))
        snapshots.append({"params": params, "batch_stats": stats})
    averager = lifecycle.swa()
    average = averager.init(snapshots[0])
    for snapshot in snapshots:
        average = averager.update(average, snapshot)
    base = (data.reshape(len(data), -1) @ np.asarray(variables["params"]["dense0"]["kernel"])).var(
        0
    )
    averaged = lifecycle.averaged_variables(model, average)["batch_stats"]["norm0"]["var"]
    np.testing.assert_allclose(averaged, 5 * base, rtol=1e-4)
    fresh = lifecycle.averaged_variables(model, average, statistics="recalibrate", batches=BATCHES)
    np.testing.assert_allclose(fresh["batch_stats"]["norm0"]["var"], 4 * base, rtol=1e-4)
    # Evaluation differs too: the averaged statistics are not the recalibrated ones.
    logits = lambda v: model.apply(v, data, train=False)  # noqa: E731
    averaged_all = lifecycle.averaged_variables(model, average)
    assert not np.allclose(logits(averaged_all), logits(fresh), atol=1e-3)


def test_update_runs_under_jit_with_donation_and_a_model_without_batch_norms():
    model, variables = initialised("mlp", norm="layer")
    assert "batch_stats" not in variables
    averager = lifecycle.ema(0.5)
    average = averager.init(variables)
    update = jax.jit(averager.update, donate_argnums=0)
    average = update(average, variables)
    assert average.batch_stats is None
    got = lifecycle.averaged_variables(model, average)
    assert set(got) == {"params"}
    chex.assert_trees_all_close(got["params"], variables["params"])


def test_bad_input_is_refused_naming_the_argument():
    model, variables = initialised("mlp")
    for decay in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="`decay`"):
            lifecycle.ema(decay)
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="`every`"):
            lifecycle.swa(every=every)
    with pytest.raises(TypeError, match="`variables`"):
        lifecycle.ema(0.9).init(variables["params"])
    average = lifecycle.ema(0.9).init(variables)
    with pytest.raises(ValueError, match="disagree on 'batch_stats'"):
        lifecycle.ema(0.9).update(average, {"params": variables["params"]})
    with pytest.raises(TypeError, match="`average`"):
        lifecycle.averaged_variables(model, variables)
    with pytest.raises(ValueError, match="`statistics`='median'"):
        lifecycle.averaged_variables(model, average, statistics="median")
    with pytest.raises(ValueError, match="needs `batches`"):
        lifecycle.averaged_variables(model, average, statistics="recalibrate")
    with pytest.raises(TypeError, match="linen `model`"):
        lifecycle.averaged_variables(None, average, statistics="recalibrate", batches=BATCHES)
    plain = lifecycle.ema(0.9).init({"params": variables["params"]})
    with pytest.raises(ValueError, match="no batch statistics"):
        lifecycle.averaged_variables(model, plain, statistics="recalibrate", batches=BATCHES)


def test_nnx_averaged_model_recalibrated_to_its_exact_population_statistics():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=rngs),
        bnnx.BatchNorm(4, track_counters=True, rngs=rngs),
        nnx.relu,
        nnx.Linear(4, 5, rngs=rngs),
        bnnx.BatchNorm(5, rngs=rngs),
    )
    x = np.asarray(jax.random.normal(jax.random.key(3), (64, 3))) * 2.0 + 1.0
    batches = [x[:32], x[32:]]
    averager = lifecycle.ema(0.5)
    start = lifecycle.nnx_variables(model)
    average = averager.init(start)
    snapshots = _snapshots(start, 3, seed=4)
    for snapshot in snapshots:
        average = averager.update(average, snapshot)
    kernel0 = np.asarray(model.layers[0].kernel[...])
    averaged = lifecycle.averaged_nnx(model, average)
    want = _ema_reference(start, snapshots, 0.5, warmup=False)
    chex.assert_trees_all_close(
        _floats64(nnx.state(averaged, nnx.Param)), want["params"], rtol=1e-6, atol=1e-6
    )
    fresh = lifecycle.averaged_nnx(model, average, statistics="recalibrate", batches=batches)
    p = _floats64({"w0": fresh.layers[0].kernel[...], "b0": fresh.layers[0].bias[...]})
    p |= _floats64({"s": fresh.layers[1].scale[...], "c": fresh.layers[1].bias[...]})
    p |= _floats64({"w1": fresh.layers[3].kernel[...], "b1": fresh.layers[3].bias[...]})
    first, second = [], []
    for batch in batches:  # training mode, batch statistics, in float64
        h = np.asarray(batch, np.float64) @ p["w0"] + p["b0"]
        first.append(h)
        h = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + EPS) * p["s"] + p["c"], 0.0)
        second.append(h @ p["w1"] + p["b1"])
    for layer, values in ((fresh.layers[1], first), (fresh.layers[4], second)):
        values = np.concatenate(values)
        np.testing.assert_allclose(layer.mean[...], values.mean(0), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(layer.var[...], values.var(0), rtol=2e-5)
    assert int(fresh.layers[1].count[...]) == 2
    np.testing.assert_array_equal(model.layers[0].kernel[...], kernel0)  # model untouched
    with pytest.raises(TypeError, match="nnx Module"):
        lifecycle.averaged_nnx({"params": {}}, average)
    with pytest.raises(ValueError, match="needs `batches`"):
        lifecycle.averaged_nnx(model, average, statistics="recalibrate")
