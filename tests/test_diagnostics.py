"""Batch-norm telemetry: the documented formulas, purity under jit, drift, skipped batches."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bnjax
from bnjax import diagnostics, lifecycle
from bnjax import nnx as bnnx
from tests.lifecycle.helpers import BATCHES, DATA, apply, initialised

MUTABLE = ["batch_stats"]


def _reference(x, mean, var, epsilon=1e-5):
    """The module docstring's formulas in float64 NumPy (features last)."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    batch_mean, batch_var = flat.mean(axis=0), flat.var(axis=0)
    mean_shift = np.abs(batch_mean - mean) / np.sqrt(var + epsilon)
    scale_shift = 0.5 * np.abs(np.log((batch_var + epsilon) / (var + epsilon)))
    drift = mean_shift + scale_shift
    return dict(
        batch_mean_abs=np.abs(batch_mean).mean(),
        batch_var=batch_var.mean(),
        running_mean_abs=np.abs(mean).mean(),
        running_var=np.mean(var),
        mean_shift=mean_shift.mean(),
        scale_shift=scale_shift.mean(),
        drift=drift.mean(),
        max_drift=drift.max(),
    )


def _assert_matches(telemetry, reference):
    for field, value in reference.items():
        np.testing.assert_allclose(getattr(telemetry, field), value, rtol=2e-5, err_msg=field)


def test_layer_telemetry_formulas():
    x = DATA[:16]
    state = bnjax.BatchNormState(
        jnp.array([19.0, 21.0]), jnp.array([4.0, 16.0]), jnp.array(3), jnp.array(1)
    )
    telemetry = jax.jit(lambda x, s: diagnostics.layer_telemetry(x, s))(x, state)
    _assert_matches(telemetry, _reference(x, np.array([19.0, 21.0]), np.array([4.0, 16.0])))
    assert (int(telemetry.nonfinite), int(telemetry.count), int(telemetry.skipped)) == (0, 3, 1)


def _conv_outputs(model, variables, x):
    _, state = model.apply(
        variables,
        x,
        train=True,
        mutable=True,
        capture_intermediates=lambda module, _: isinstance(module, nn.Conv),
    )
    return {name: v["__call__"][0] for name, v in state["intermediates"].items() if "conv" in name}


def test_linen_telemetry_in_a_jitted_training_step_changes_nothing_else():
    model, variables = initialised("cnn", counters=True)
    x = DATA[:16]

    @jax.jit
    def step_with_telemetry(variables, x):
        with diagnostics.telemetry():
            return model.apply(variables, x, train=True, mutable=[*MUTABLE, diagnostics.COLLECTION])

    logits, updates = step_with_telemetry(variables, x)
    plain_logits, plain_updates = apply(model, variables, x, train=True, mutable=MUTABLE)
    chex.assert_trees_all_equal(logits, plain_logits)
    chex.assert_trees_all_equal({k: updates[k] for k in MUTABLE}, plain_updates)
    inputs = jax.jit(lambda v, x: _conv_outputs(model, v, x))(variables, x)
    per_layer = diagnostics.summaries(updates[diagnostics.COLLECTION])
    for i in range(2):
        running = variables["batch_stats"][f"norm{i}"]  # before this step's update
        telemetry = updates[diagnostics.COLLECTION][f"norm{i}"]["telemetry"][0]
        _assert_matches(
            telemetry,
            _reference(
                np.asarray(inputs[f"conv{i}"]),
                np.asarray(running["mean"]),
                np.asarray(running["var"]),
            ),
        )
        assert int(telemetry.count) == 2  # after this step's update (the helper's count is 1)
        assert float(per_layer[f"bn/norm{i}/drift"]) == float(telemetry.drift)
    assert len(per_layer) == 2 * len(diagnostics.LayerTelemetry._fields)
    # Without the collection being mutable nothing is recorded, and nothing fails.
    with diagnostics.telemetry():
        _, updates = model.apply(variables, x, train=True, mutable=MUTABLE)
    assert diagnostics.COLLECTION not in updates


def test_drift_vanishes_after_recalibration_and_flags_a_shifted_batch():
    model, variables = initialised("cnn")
    recalibrated = lifecycle.recalibrate(
        model, variables, BATCHES, mode="full_batch", apply_kwargs={"train": False}
    )
    _, stale = diagnostics.collect(model, variables, DATA, train=False)
    _, fresh = diagnostics.collect(model, recalibrated, DATA, train=False)
    _, shifted = diagnostics.collect(model, recalibrated, DATA * 1.5 - 5.0, train=False)
    for layer in (("norm0",), ("norm1",)):
        assert float(fresh[layer].drift) < 1e-4
        assert float(fresh[layer].max_drift) < 1e-4
        assert float(stale[layer].drift) > 0.1 and float(shifted[layer].drift) > 0.1


def test_a_skipped_non_finite_batch_is_reported():
    x = DATA[:16].copy()
    x[3, 0, 0, 0] = np.nan
    model, variables = initialised("mlp", counters=True)
    _, per_layer = diagnostics.collect(model, variables, x, train=True)
    assert int(per_layer[("norm0",)].skipped) == 1
    assert int(per_layer[("norm0",)].nonfinite) == 8  # NaN reaches every channel of dense0
    assert int(per_layer[("norm0",)].count) == 1  # not updated by this batch
    # Without counters (the default) the skip shows as non-finite batch statistics.
    model, variables = initialised("mlp")
    _, per_layer = diagnostics.collect(model, variables, x, train=True)
    assert int(per_layer[("norm0",)].nonfinite) == 8
    assert (int(per_layer[("norm0",)].count), int(per_layer[("norm0",)].skipped)) == (-1, -1)
    _, clean = diagnostics.collect(model, variables, DATA[:16], train=True)
    assert int(clean[("norm0",)].nonfinite) == 0


def test_nnx_collect():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(2, 3, rngs=rngs)
            self.norm = bnnx.BatchNorm(3, track_counters=True, rngs=rngs)
            self.flax_norm = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.flax_norm(self.norm(self.dense(x)))

    model = Net(nnx.Rngs(0))
    x = DATA.reshape(-1, 2)[:32]
    before = np.array(model.norm.mean[...]), np.array(model.norm.var[...])
    hidden = np.asarray(model.dense(x))
    _, per_layer = diagnostics.collect(model, x)
    assert set(per_layer) == {("norm",), ("flax_norm",)}
    _assert_matches(per_layer[("norm",)], _reference(hidden, *before))
    assert int(per_layer[("norm",)].count) == 1 and int(per_layer[("flax_norm",)].count) == -1
    assert type(model.norm) is bnnx.BatchNorm and int(model.norm.count[...]) == 1
    assert diagnostics.summaries(per_layer)["bn/norm/skipped"] == 0
