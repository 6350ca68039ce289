"""MovingAverageBatchNorm in linen, the bundled train step, and the lifecycle tools."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax import linen as bnn
from bnjax import nnx as bnnx
from bnjax.lifecycle import fold_model
from bnjax.train import optim, steps

X = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2.0 + 0.5


def test_linen_module_is_the_core_function():
    layer = bnn.MovingAverageBatchNorm(window=3, momentum=0.9)
    variables = layer.init(jax.random.key(1), X, use_running_average=False)
    assert variables["backward_probe"]["probe"].shape == (2, 3)
    y, updates = layer.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    state = bnjax.moving_average_batch_norm_state(3, window=3)
    y_core, state = bnjax.moving_average_batch_norm(X, state, training=True, momentum=0.9)
    chex.assert_trees_all_close(y, y_core)
    chex.assert_trees_all_close(dict(updates["batch_stats"]), state._asdict())
    evaluation = layer.apply({**variables, **updates}, X, use_running_average=True)
    chex.assert_trees_all_close(
        evaluation, bnjax.moving_average_batch_norm(X, state, training=False)[0]
    )


def test_probe_gradient_is_what_the_core_returns_and_fills_the_history():
    layer = bnn.MovingAverageBatchNorm(use_running_average=False, window=2)
    variables = layer.init(jax.random.key(1), X)
    cotangent = jnp.cos(X)

    def loss(probes):
        y, updates = layer.apply(
            {**variables, "backward_probe": probes}, X, mutable=["batch_stats"]
        )
        return jnp.sum(y * cotangent), updates["batch_stats"]

    probe_grads, stats = jax.grad(loss, has_aux=True)(variables["backward_probe"])
    # psi_B = mean(dL/dx_hat * x_hat) with x_hat = x / sqrt(mean x^2 + eps), r = 1 (fresh).
    x_hat = X / jnp.sqrt(jnp.mean(X**2, axis=(0, 1, 2)) + 1e-5)
    psi = jnp.mean(cotangent * x_hat, axis=(0, 1, 2))
    chex.assert_trees_all_close(probe_grads["probe"][1], psi, rtol=1e-5)
    chex.assert_trees_all_close(probe_grads["probe"][0], jnp.zeros(3))  # reduced: no g
    stats = bnn.apply_backward_statistics(stats, probe_grads)
    chex.assert_trees_all_close(stats["grad_scaled_history"][0], psi, rtol=1e-5)
    assert int(stats["backward_count"]) == 1


def test_backward_probes_are_empty_for_other_norms():
    for norm in ("batch", "batch_renorm"):
        model = steps.make_model("small_cnn", num_classes=10, norm=norm, features=(4,))
        variables = model.init(jax.random.key(0), X, train=False)
        assert bnn.backward_probes(variables["batch_stats"]) == {}
        assert bnn.PROBE_COLLECTION not in variables


def test_train_step_differentiates_the_probes_and_stores_their_gradient():
    """Plain SGD: the step equals the gradient of (params, probes) computed here, and each
    layer's backward history receives its probe's gradient."""
    model = steps.make_model(
        "mlp", num_classes=10, norm="moving_average", features=(6, 5), bn_momentum=0.9
    )
    optimizer = optim.make_optimizer("sgd", 0.1)
    labels = jnp.arange(8) % 10
    state = steps.initial_state(model, optimizer, X[:2], 0)
    assert bnn.PROBE_COLLECTION not in state
    probes = bnn.backward_probes(state["batch_stats"])
    assert sorted(probes) == ["norm0", "norm1"], sorted(probes)

    def loss(params, probes):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        logits, updates = model.apply(
            {**variables, "backward_probe": probes}, X, train=True, mutable=["batch_stats"]
        )
        mean = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return mean, updates["batch_stats"]

    grad_fn = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
    (grads, probe_grads), stats = grad_fn(state["params"], probes)
    step = jax.jit(steps.make_train_step(model, optimizer), static_argnums=2)
    new_state, _ = step(state, {"image": X, "label": labels}, None)
    want = jax.tree.map(lambda p, g: p - 0.1 * g, state["params"], grads)
    chex.assert_trees_all_close(new_state["params"], want, rtol=1e-5, atol=1e-6)
    want_stats = bnn.apply_backward_statistics(stats, probe_grads)
    chex.assert_trees_all_close(new_state["batch_stats"], want_stats, rtol=1e-5, atol=1e-7)
    for layer in ("norm0", "norm1"):
        assert int(new_state["batch_stats"][layer]["backward_count"]) == 1
        assert np.any(new_state["batch_stats"][layer]["grad_scaled_history"][0] != 0)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(5, (3, 3), use_bias=False, name="conv")(x)
        x = bnn.MovingAverageBatchNorm(use_running_average=not train, window=2, name="norm")(x)
        return nn.relu(x)


def test_fold_model_folds_it_like_batch_norm():
    model = _ConvNet()
    variables = model.init(jax.random.key(2), X)
    # Centralize the kernel by hand (zero mean over each output channel's fan-in).
    kernel = variables["params"]["conv"]["kernel"]
    kernel = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    variables = {**variables, "params": {**variables["params"], "conv": {"kernel": kernel}}}
    for _ in range(3):
        _, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    folded = fold_model(model, variables, X)
    assert folded.plan.pairs == {("norm",): ("conv",)}
    chex.assert_trees_all_close(folded(X), model.apply(variables, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("centered", [False, True])
def test_nnx_module_equals_linen(centered):
    from flax import nnx

    layer = bnnx.MovingAverageBatchNorm(3, window=3, centered=centered, rngs=nnx.Rngs(0))
    linen_layer = bnn.MovingAverageBatchNorm(window=3, centered=centered)
    variables = linen_layer.init(jax.random.key(0), X, use_running_average=True)
    for step in range(2):
        x = X * (step + 1)
        y_linen, updates = linen_layer.apply(
            variables, x, use_running_average=False, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
        chex.assert_trees_all_close(layer(x), y_linen)
    chex.assert_trees_all_close(
        {k: v[...] for k, v in layer.statistics().items()}, dict(variables["batch_stats"])
    )
    layer.eval()
    chex.assert_trees_all_close(layer(X), linen_layer.apply(variables, X, use_running_average=True))


def test_a_channel_without_valid_values_outputs_its_bias_with_a_finite_gradient():
    state = bnjax.moving_average_batch_norm_state(2, window=2)
    x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    mask = jnp.array([[True, False], [True, False]])  # channel 1 has no valid value
    bias = jnp.array([0.5, -0.5])

    def f(x):
        return bnjax.moving_average_batch_norm(x, state, None, bias, training=True, mask=mask)

    y, vjp, new = jax.vjp(f, x, has_aux=True)
    np.testing.assert_allclose(y[:, 1], [-0.5, -0.5])
    assert float(new.var[1]) == 1.0  # kept
    (dx,) = vjp(jnp.ones_like(y))
    assert bool(jnp.all(jnp.isfinite(dx)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_parallel_modes_train(tmp_path, mode):
    from bnjax.train import loop
    from tests.train.helpers import tiny_config

    config = tiny_config(
        norm="moving_average", parallel=mode, num_devices=None, num_steps=4, eval_every=4,
        log_every=2, checkpoint_every=4, warmup_steps=1, progress=False,
    )  # fmt: skip
    assert np.isfinite(loop.train_and_evaluate(config, str(tmp_path))["loss"])


def test_recalibrate_sets_the_population_second_moment():
    """The reduced form evaluates with (mean 0, var = mean x^2): recalibration estimates that."""
    model = _ConvNet()
    variables = model.init(jax.random.key(2), X)
    batches = [X[:4] + 1.0, X[4:] - 0.5]
    recalibrated = bnjax.lifecycle.recalibrate(model, variables, batches, mode="full_batch")
    stats = recalibrated["batch_stats"]["norm"]
    conv = nn.Conv(5, (3, 3), use_bias=False)
    z = jnp.concatenate(
        [conv.apply({"params": variables["params"]["conv"]}, b) for b in batches]
    ).reshape(-1, 5)
    np.testing.assert_allclose(stats["mean"], jnp.zeros(5))
    np.testing.assert_allclose(stats["var"], jnp.mean(z**2, axis=0), rtol=1e-5)
