"""reset_statistics and freeze: fresh statistics; fine-tuning that leaves them bit-identical."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax import lifecycle
from bnjax import nnx as bnnx
from tests.lifecycle.helpers import DATA, initialised

IMAGES = DATA[:16]
LABELS = jnp.arange(16) % 10
X_FLAT = DATA.reshape(-1, 8)[:16]


def _trained_cnn():
    """A SmallCNN whose statistics have moved away from their initial values (cached); its norms
    keep counters ('count' 1, 'skipped' 0 in 'batch_stats')."""
    return initialised("cnn", counters=True)


def _fine_tune(model, variables, tx, apply_fn, steps=3):
    """`steps` SGD steps in training mode with `apply_fn`; returns the final variables."""

    def loss(params, state):
        logits, updates = apply_fn(
            {**state, "params": params},
            IMAGES,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean(), updates

    @jax.jit
    def step(variables, opt_state):
        state = {k: v for k, v in variables.items() if k != "params"}
        grads, updates = jax.grad(loss, has_aux=True)(variables["params"], state)
        changes, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state

    opt_state = tx.init(variables["params"])
    for _ in range(steps):
        variables, opt_state = step(variables, opt_state)
    return variables


@pytest.mark.parametrize("freeze_scale_and_bias", [False, True])
def test_linen_freeze_keeps_statistics_bit_identical(freeze_scale_and_bias):
    model, variables = _trained_cnn()
    tx = optax.sgd(0.5)
    if freeze_scale_and_bias:
        tx = lifecycle.freeze_optimizer(tx, variables)
    tuned = _fine_tune(model, variables, tx, lifecycle.freeze(model.apply))
    chex.assert_trees_all_equal(tuned["batch_stats"], variables["batch_stats"])  # counters too
    assert int(tuned["batch_stats"]["norm0"]["count"]) == 1
    assert not np.allclose(
        tuned["params"]["conv0"]["kernel"], variables["params"]["conv0"]["kernel"]
    )
    norm_params = (tuned["params"]["norm0"], variables["params"]["norm0"])
    if freeze_scale_and_bias:
        chex.assert_trees_all_equal(*norm_params)
    else:
        assert not np.allclose(norm_params[0]["bias"], norm_params[1]["bias"])
    # Frozen training mode is evaluation mode.
    frozen, _ = lifecycle.freeze(model.apply)(variables, IMAGES, train=True, mutable=True)
    chex.assert_trees_all_close(frozen, model.apply(variables, IMAGES, train=False), atol=1e-6)


def test_without_freeze_the_statistics_move():
    model, variables = _trained_cnn()
    tuned = _fine_tune(model, variables, optax.sgd(0.5), model.apply, steps=1)
    assert not np.allclose(
        tuned["batch_stats"]["norm0"]["mean"], variables["batch_stats"]["norm0"]["mean"]
    )
    assert int(tuned["batch_stats"]["norm0"]["count"]) == 2


def test_freeze_selected_layers_only():
    model, variables = _trained_cnn()
    apply_fn = lifecycle.freeze(model.apply, layers=["norm0"])
    _, updates = apply_fn(variables, IMAGES, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_equal(updates["batch_stats"]["norm0"], variables["batch_stats"]["norm0"])
    assert not np.allclose(
        updates["batch_stats"]["norm1"]["var"], variables["batch_stats"]["norm1"]["var"]
    )
    labels = lifecycle.bn_param_labels(variables, layers=["norm1"])
    assert labels["norm1"] == {"scale": "frozen", "bias": "frozen"}
    assert labels["norm0"]["scale"] == labels["conv0"]["kernel"] == "trainable"
    assert lifecycle.unfreeze(apply_fn) == model.apply
    with pytest.raises(TypeError, match=r"model\.apply"):
        lifecycle.freeze(model)


def test_flax_batch_norm_with_a_call_argument_freezes_too():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.BatchNorm(name="bn")(x, use_running_average=not train)

    x = X_FLAT
    variables = Net().init(jax.random.key(0), x, train=False)
    with lifecycle.frozen_statistics():
        _, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(8, 4, rngs=rngs)
        self.norm = bnnx.BatchNorm(4, track_counters=True, rngs=rngs)
        self.renorm = bnnx.BatchRenorm(4, track_counters=True, rngs=rngs)
        self.head = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.renorm(self.norm(self.dense(x)))))


def _nnx_steps(model, wrt, steps=3):
    x = X_FLAT
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=wrt)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)

    for _ in range(steps):
        step(model, optimizer)


def _snapshot(model):
    """A copy of every variable's value (nnx.state holds references to the live variables)."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("freeze_scale_and_bias", [False, True])
def test_nnx_freeze(freeze_scale_and_bias):
    model = _NnxNet(nnx.Rngs(0))
    model(X_FLAT)  # move the statistics off their initial values
    lifecycle.freeze(model)
    model.train()  # does not unfreeze
    before = _snapshot(model)
    wrt = lifecycle.trainable_filter(model, freeze_scale_and_bias=freeze_scale_and_bias)
    _nnx_steps(model, wrt)
    after = _snapshot(model)
    for layer in ("norm", "renorm"):
        for name in ("mean", "var", "count", "skipped"):
            np.testing.assert_array_equal(after[layer][name], before[layer][name])
    np.testing.assert_array_equal(after["renorm"]["step"], before["renorm"]["step"])
    assert not np.allclose(after["dense"]["kernel"], before["dense"]["kernel"])
    same_bias = np.array_equal(after["norm"]["bias"], before["norm"]["bias"])
    assert same_bias == freeze_scale_and_bias
    lifecycle.unfreeze(model)
    assert type(model.norm) is bnnx.BatchNorm
    model(X_FLAT)
    assert int(model.norm.count[...]) == 2


def test_reset_statistics_everywhere():
    _, variables = _trained_cnn()
    stats = variables["batch_stats"]
    skipped = {**stats["norm0"], "skipped": jnp.array(3, jnp.int32)}  # a skipped batch
    variables = {**variables, "batch_stats": {**stats, "norm0": skipped}}
    fresh = lifecycle.reset_statistics(variables)
    for layer in fresh["batch_stats"].values():
        np.testing.assert_array_equal(layer["mean"], 0.0)
        np.testing.assert_array_equal(layer["var"], 1.0)
        assert (int(layer["count"]), int(layer["skipped"])) == (0, 0)
    assert int(variables["batch_stats"]["norm0"]["count"]) == 1  # the input is not modified
    _, plain = initialised("cnn")  # without counters (the default) none are added
    plain_fresh = lifecycle.reset_statistics(plain)
    assert jax.tree.structure(plain_fresh) == jax.tree.structure(plain)
    np.testing.assert_array_equal(plain_fresh["batch_stats"]["norm1"]["var"], 1.0)
    partial = lifecycle.reset_statistics(variables, layers=lambda path: path == ("norm1",))
    chex.assert_trees_all_equal(partial["batch_stats"]["norm0"], variables["batch_stats"]["norm0"])

    model = _NnxNet(nnx.Rngs(0))
    model(X_FLAT)
    lifecycle.reset_statistics(model)
    assert int(model.renorm.step[...]) == 1  # the warm-up schedule is kept
    np.testing.assert_array_equal(model.renorm.renorm_var[...], 1.0)
    assert int(model.norm.count[...]) == 0

    moved = bnjax.BatchNormState(jnp.ones(3), jnp.full(3, 2.0), jnp.array(4), jnp.array(1))
    states = lifecycle.reset_statistics({"a": [moved], "b": jnp.ones(2)})
    chex.assert_trees_all_equal(states["a"][0], bnjax.batch_norm_state(3))
    chex.assert_trees_all_equal(states["b"], jnp.ones(2))
