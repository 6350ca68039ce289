"""recalibrate: exact population statistics, checked against float64 NumPy over the same data."""

import inspect
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax import lifecycle
from bnjax import nnx as bnnx
from bnjax.lifecycle.layers import feature_moments
from tests.lifecycle.helpers import BATCHES, DATA, MODELS, apply, initialised

EPS = 1e-5
EVAL = {"train": False}  # the interceptor switches the norms; dropout (if any) stays off


def _population(values: np.ndarray, ddof: int = 0):
    """Float64 mean and variance per channel (last axis) over everything else."""
    flat = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    return flat.mean(axis=0), flat.var(axis=0, ddof=ddof)


def _assert_state(layer, mean, var, rtol=2e-5):
    np.testing.assert_allclose(layer["mean"], mean, rtol=rtol, atol=rtol * np.abs(mean).max())
    np.testing.assert_allclose(layer["var"], var, rtol=rtol)


def _mlp_train_reference(variables, batches, depth: int):
    """The MLP in float64 NumPy, each BN normalizing with its batch statistics (as training)."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    inputs = [[] for _ in range(depth)]
    for batch in batches:
        h = batch.reshape(len(batch), -1).astype(np.float64)
        for i in range(depth):
            h = h @ params[f"dense{i}"]["kernel"]
            inputs[i].append(h)
            mean, var = h.mean(axis=0), h.var(axis=0)
            h = (h - mean) / np.sqrt(var + EPS) * params[f"norm{i}"]["scale"]
            h = np.maximum(h + params[f"norm{i}"]["bias"], 0.0)
    return [np.concatenate(values) for values in inputs]


def test_train_mode_equals_float64_population_statistics_of_the_layer_inputs():
    model, variables = initialised("mlp", counters=True)
    new = lifecycle.recalibrate(model, variables, BATCHES, apply_kwargs=EVAL)
    for i, values in enumerate(_mlp_train_reference(variables, BATCHES, depth=2)):
        mean, var = _population(values)
        _assert_state(new["batch_stats"][f"norm{i}"], mean, var)
        # Not the average of the per-batch variances, which misses the spread of batch means.
        per_batch = np.mean([v.var(axis=0) for v in np.split(values, len(BATCHES))], axis=0)
        assert not np.allclose(per_batch, var, rtol=1e-3)
        assert int(new["batch_stats"][f"norm{i}"]["count"]) == len(BATCHES)
        assert int(new["batch_stats"][f"norm{i}"]["skipped"]) == 0
    chex.assert_trees_all_equal(new["params"], variables["params"])
    # Without counters (flax's variables, the default) the same statistics, and none are added.
    plain_model, plain = initialised("mlp")
    plain_new = lifecycle.recalibrate(plain_model, plain, BATCHES, apply_kwargs=EVAL)
    assert jax.tree.structure(plain_new) == jax.tree.structure(plain)
    for i in range(2):
        chex.assert_trees_all_close(
            plain_new["batch_stats"][f"norm{i}"],
            {k: new["batch_stats"][f"norm{i}"][k] for k in ("mean", "var")},
            rtol=1e-6,
        )


def _conv_outputs(model, variables, batch):
    """The inputs of the CNN's norms in training mode: its convolutions' outputs (flax)."""
    _, state = model.apply(
        variables,
        batch,
        train=True,
        mutable=True,
        capture_intermediates=lambda module, _: isinstance(module, nn.Conv),
    )
    return {
        name: value["__call__"][0]
        for name, value in state["intermediates"].items()
        if name.startswith("conv")
    }


@pytest.mark.parametrize("unbiased", [False, True])
def test_cnn_train_mode_matches_captured_inputs_biased_or_unbiased(unbiased):
    _, variables = initialised("cnn")
    model = MODELS["cnn"](norm_options={"use_unbiased_running_var": unbiased})
    new = lifecycle.recalibrate(model, variables, BATCHES, apply_kwargs=EVAL)
    conv_outputs = jax.jit(lambda v, x: _conv_outputs(model, v, x))
    captured = [conv_outputs(variables, batch) for batch in BATCHES]
    for i in range(2):
        values = np.concatenate([np.asarray(c[f"conv{i}"]) for c in captured])
        _assert_state(new["batch_stats"][f"norm{i}"], *_population(values, ddof=int(unbiased)))


def _assert_eval_equals_full_batch_training(model, variables):
    evaluation = apply(model, variables, DATA, train=False)
    training, _ = apply(model, variables, DATA, train=True, mutable=["batch_stats"])
    scale = float(np.abs(training).max())
    np.testing.assert_allclose(evaluation, training, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_full_batch_mode_evaluation_equals_training_on_the_whole_data(name):
    model, variables = initialised(name)
    with pytest.raises(AssertionError):  # stale statistics: the two modes disagree
        _assert_eval_equals_full_batch_training(model, variables)
    new = lifecycle.recalibrate(model, variables, BATCHES, mode="full_batch", apply_kwargs=EVAL)
    _assert_eval_equals_full_batch_training(model, new)
    if name == "cnn":  # and the state holds the float64 statistics of that full-batch pass
        captured = jax.jit(lambda v, x: _conv_outputs(model, v, x))(new, DATA)
        for i in range(2):
            values = np.asarray(captured[f"conv{i}"])
            _assert_state(new["batch_stats"][f"norm{i}"], *_population(values))


def test_a_non_finite_batch_is_left_out_and_counted():
    model, variables = initialised("mlp", counters=True)
    poisoned = [*BATCHES[:3], np.full_like(BATCHES[0], np.nan)]
    new = lifecycle.recalibrate(model, variables, poisoned, apply_kwargs=EVAL)
    clean = lifecycle.recalibrate(model, variables, BATCHES[:3], apply_kwargs=EVAL)
    for layer in ("norm0", "norm1"):
        chex.assert_trees_all_close(
            {k: new["batch_stats"][layer][k] for k in ("mean", "var")},
            {k: clean["batch_stats"][layer][k] for k in ("mean", "var")},
            rtol=1e-6,
        )
        counters = new["batch_stats"][layer]
        assert int(clean["batch_stats"][layer]["skipped"]) == 0
        assert (int(counters["count"]), int(counters["skipped"])) == (3, 1)


def test_sync_over_devices_equals_one_device():
    """pmap over 4 devices with synchronised BN == one device on the whole batches."""
    single, variables = initialised("cnn")
    synced = MODELS["cnn"](norm_options={"axis_name": "batch"})
    sharded = [batch.reshape(4, 4, *batch.shape[1:]) for batch in BATCHES]
    on_devices = lifecycle.recalibrate(
        synced, variables, sharded, axis_name="batch", apply_kwargs=EVAL
    )
    on_one = lifecycle.recalibrate(single, variables, BATCHES, apply_kwargs=EVAL)
    chex.assert_trees_all_close(on_devices["batch_stats"], on_one["batch_stats"], rtol=1e-5)


def test_unjitted_with_progress_bar_and_num_batches(capsys):
    model, variables = initialised("mlp", counters=True)
    new = lifecycle.recalibrate(
        model,
        variables,
        iter(BATCHES),
        num_batches=2,
        jit=False,
        progress=True,
        apply_kwargs=EVAL,
    )
    assert int(new["batch_stats"]["norm0"]["count"]) == 2
    assert "recalibrating" in capsys.readouterr().err


def test_flax_batch_norm_and_bnjax_renorm():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True, name="flax_bn")(x)
            return bnjax.linen.BatchRenorm(use_running_average=True, name="renorm")(x * 2.0)

    x = DATA.reshape(-1, 2)[:64]
    variables = Net().init(jax.random.key(0), x)
    new = lifecycle.recalibrate(Net(), variables, [x[:32], x[32:]])
    _assert_state(new["batch_stats"]["flax_bn"], *_population(x))
    renorm = new["batch_stats"]["renorm"]
    np.testing.assert_allclose(renorm["renorm_var"], renorm["var"])
    assert int(renorm["step"]) == 0  # the warm-up schedule does not restart


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(2, 3, rngs=rngs)
        self.norm = bnnx.BatchNorm(3, track_counters=True, rngs=rngs)
        self.out = nnx.Linear(3, 3, rngs=rngs)
        self.flax_norm = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
        return self.flax_norm(self.out(nnx.relu(self.norm(self.dense(x)))))


def test_nnx_models_in_both_modes():
    x = DATA.reshape(-1, 2)[:96]
    batches = [x[i : i + 16] for i in range(0, 96, 16)]
    model = _NnxNet(nnx.Rngs(0))
    assert lifecycle.recalibrate_nnx(model, batches) is model
    _assert_state(
        {"mean": model.norm.mean[...], "var": model.norm.var[...]},
        *_population(np.asarray(model.dense(x))),
    )
    assert int(model.norm.count[...]) == len(batches)
    lifecycle.recalibrate_nnx(model, batches, mode="full_batch")
    model.eval()
    evaluation = model(x)
    model.train()
    training = model(x)
    np.testing.assert_allclose(evaluation, training, atol=1e-5 * float(np.abs(training).max()))
    assert type(model.norm) is bnnx.BatchNorm  # the recording subclass never leaks


def test_functional_states_with_layer_inputs_and_masks():
    x = DATA.reshape(-1, 2)[:64]
    mask = (np.arange(64) % 4 != 0).reshape(64, 1)  # per example, broadcast as in flax

    def layer_inputs(states, batch, training):
        inputs, keep = batch
        h = inputs * 2.0 - 1.0
        y, _ = bnjax.batch_norm(h, states["first"], training=training, mask=keep)
        return {"first": lifecycle.LayerInput(h, mask=keep), "second": y @ np.ones((2, 2))}

    states = {"first": bnjax.batch_norm_state(2), "second": bnjax.batch_renorm_state(2)}
    batches = [(x[:32], mask[:32]), (x[32:], mask[32:])]
    new = lifecycle.recalibrate_states(layer_inputs, states, batches, unbiased=True)
    _assert_state(new["first"]._asdict(), *_population(x[mask[:, 0]] * 2.0 - 1.0, ddof=1))
    assert isinstance(new["second"], bnjax.BatchRenormState) and int(new["second"].count) == 2


def test_masks_broadcast_as_in_the_modules():
    """A mask broadcasts against x by NumPy rules, as the modules apply it: (C,) marks
    features; a per-example mask is written (N, 1), and a bare (N,) one is refused."""
    x = DATA.reshape(-1, 2)[:2] * np.array([1.0, -1.0])
    features = np.array([True, False])
    # A (2,) mask over x of shape (2, 2): which channels enter, not which examples.
    moments = feature_moments(x, -1, features)
    np.testing.assert_array_equal(moments.count, [2.0, 0.0])
    np.testing.assert_allclose(moments.mean[0], x[:, 0].mean(), rtol=1e-6)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            return bnjax.linen.BatchNorm(use_running_average=True, name="bn")(x, mask=mask)

    x = DATA.reshape(-1, 2)[:32]
    variables = Net().init(jax.random.key(0), x, x[:, :1] > 0)
    keep = (np.arange(32) % 2 == 0).reshape(32, 1)
    new = lifecycle.recalibrate(Net(), variables, [x], apply_kwargs={"mask": keep})
    _assert_state(new["batch_stats"]["bn"], *_population(x[keep[:, 0]]))
    with pytest.raises(ValueError, match=r"mask\.reshape\(32, 1\)"):
        feature_moments(x, -1, keep[:, 0])


def test_accumulate_and_population_state_merge_exactly():
    values = DATA.reshape(-1, 2)
    halves = [feature_moments(v, -1) for v in np.split(values, 2)]
    totals = {"layer": lifecycle.Total(jax.tree.map(jnp.zeros_like, halves[0]), 0, 0)}
    for moments in halves:
        totals = jax.jit(lifecycle.accumulate)(totals, {"layer": moments})
    state = lifecycle.population_state(totals["layer"].moments, batches=2)
    _assert_state(state._asdict(), *_population(values))
    assert int(state.count) == 2


def test_errors_and_warnings():
    model, variables = initialised("mlp")
    with pytest.raises(ValueError, match="batch_stats"):
        lifecycle.recalibrate(model, {"params": variables["params"]}, BATCHES)
    with pytest.raises(ValueError, match="mode"):
        lifecycle.recalibrate(model, variables, BATCHES, mode="precise")
    with pytest.raises(ValueError, match="no batch"):
        lifecycle.recalibrate(model, variables, [], apply_kwargs=EVAL)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'batches'"):
        lifecycle.recalibrate(model, BATCHES)
    spare = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    unused = {**variables, "batch_stats": {**variables["batch_stats"], "spare": spare}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lifecycle.recalibrate(model, unused, BATCHES[:1], apply_kwargs=EVAL)
    assert any("never called" in str(w.message) for w in caught)


def test_each_front_end_names_the_one_a_model_needs():
    """A model given to the wrong front end is refused with the call to make instead."""
    model, variables = initialised("mlp")
    nnx_model = _NnxNet(nnx.Rngs(0))
    states = {"bn": bnjax.batch_norm_state(4)}
    with pytest.raises(TypeError, match=r"call recalibrate_nnx\(model, batches"):
        lifecycle.recalibrate(nnx_model, variables, BATCHES)
    with pytest.raises(TypeError, match=r"call recalibrate_states\(layer_inputs, states, batches"):
        lifecycle.recalibrate(lambda states, batch, training: {"bn": batch}, states, BATCHES)
    with pytest.raises(TypeError, match=r"call recalibrate\(model, variables, batches"):
        lifecycle.recalibrate_nnx(model, BATCHES)
    with pytest.raises(TypeError, match=r"call recalibrate_nnx\(model, batches"):
        lifecycle.recalibrate_states(nnx_model, states, BATCHES)
    with pytest.raises(TypeError, match="`layer_inputs` must be a function, got dict"):
        lifecycle.recalibrate_states(states, states, BATCHES)


def test_an_option_of_another_front_end_is_refused_not_ignored():
    """Each front end takes exactly its own keywords: `unbiased` means nothing to linen (the
    modules say whether they store the unbiased variance), `apply_kwargs` nothing to nnx."""
    model, variables = initialised("mlp")
    with pytest.raises(TypeError, match="unexpected keyword argument 'unbiased'"):
        lifecycle.recalibrate(model, variables, BATCHES, unbiased=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'apply_kwargs'"):
        lifecycle.recalibrate_nnx(_NnxNet(nnx.Rngs(0)), BATCHES, apply_kwargs=EVAL)
    with pytest.raises(TypeError, match="unexpected keyword argument 'forward'"):
        lifecycle.recalibrate_states(lambda s, b, t: s, {}, BATCHES, forward=None)


def test_no_public_function_of_the_lifecycle_takes_a_private_parameter():
    """A leading underscore on a public path (once `layer_input_moments(_unbiased=...)`)
    is an internal channel every user can see and nobody should use."""
    private = {
        f"{name}({parameter})"
        for name in lifecycle.__all__
        if callable(value := getattr(lifecycle, name)) and not isinstance(value, type)
        for parameter in inspect.signature(value).parameters
        if parameter.startswith("_")
    }
    assert not private


def test_the_pure_pieces_run_inside_one_jitted_scan():
    """layer_input_moments + accumulate + population_state: a whole recalibration in jit."""
    model, variables = initialised("mlp")
    stacked = np.stack(BATCHES)

    @jax.jit
    def population(variables, stacked):
        def body(totals, batch):
            return lifecycle.accumulate(
                totals, lifecycle.layer_input_moments(model, variables, batch, train=False)
            ), None

        shapes = jax.eval_shape(
            lambda: lifecycle.layer_input_moments(model, variables, stacked[0], train=False)
        )
        totals, _ = jax.lax.scan(body, lifecycle.empty_totals(shapes), stacked)
        return {key: lifecycle.population_state(total.moments) for key, total in totals.items()}

    states = population(variables, stacked)
    looped = lifecycle.recalibrate(model, variables, BATCHES, apply_kwargs=EVAL)
    for i in range(2):
        chex.assert_trees_all_close(
            states[(f"norm{i}",)].var, looped["batch_stats"][f"norm{i}"]["var"], rtol=1e-6
        )
