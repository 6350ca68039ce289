"""batch_norm on one device: semantics, conventions, derivatives, dtypes, guards."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from tests.core import reference

LAYOUTS = {
    # name: (shape, feature axis, reduction axes)
    "nhwc": ((6, 3, 4, 5), -1, (0, 1, 2)),
    "nchw": ((6, 5, 3, 4), 1, (0, 2, 3)),
    "nd": ((7, 5), -1, (0,)),
}


def _random(shape, key=0, loc=0.0, scale=1.0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(key), shape) * scale + loc).astype(dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_flax_batch_norm_in_both_modes(layout):
    shape, axis, _ = LAYOUTS[layout]
    channels = shape[axis]
    scale = _random((channels,), 1, loc=1.0)
    bias = _random((channels,), 2)
    module = nn.BatchNorm(axis=axis, momentum=0.9, epsilon=1e-5)
    flax_vars = {"params": {"scale": scale, "bias": bias}}
    init = module.init(jax.random.key(0), _random(shape), use_running_average=False)
    flax_vars["batch_stats"] = init["batch_stats"]
    state = bnjax.batch_norm_state(channels)
    for step in range(3):
        x = _random(shape, 10 + step, loc=step, scale=2.0)
        y_flax, updates = module.apply(
            flax_vars, x, use_running_average=False, mutable=["batch_stats"]
        )
        flax_vars["batch_stats"] = updates["batch_stats"]
        y, state = bnjax.batch_norm(
            x, state, scale, bias, training=True, momentum=0.9, epsilon=1e-5, axis=axis
        )
        chex.assert_trees_all_close(y, y_flax, atol=2e-5)
        chex.assert_trees_all_close(state.mean, flax_vars["batch_stats"]["mean"], atol=1e-6)
        chex.assert_trees_all_close(state.var, flax_vars["batch_stats"]["var"], rtol=1e-5)
    x = _random(shape, 99)
    y_flax = module.apply(flax_vars, x, use_running_average=True)
    y, same_state = bnjax.batch_norm(x, state, scale, bias, training=False, axis=axis)
    chex.assert_trees_all_close(y, y_flax, atol=2e-5)
    assert same_state is state
    assert int(state.count) == 3 and int(state.skipped) == 0


def test_unbiased_running_var_follows_pytorch_rule():
    # PyTorch: running = (1 - m_pt) * running + m_pt * batch, unbiased batch variance, m_pt=0.1.
    shape, axis, axes = LAYOUTS["nchw"]
    running_mean, running_var = np.zeros(shape[1]), np.ones(shape[1])
    state = bnjax.batch_norm_state(shape[1])
    for step in range(3):
        x = _random(shape, step, loc=3.0, scale=0.5)
        mean, _, unbiased = reference.numpy_moments(x, axes)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * unbiased
        _, state = bnjax.batch_norm(
            x, state, training=True, momentum=0.9, axis=axis, use_unbiased_running_var=True
        )
    np.testing.assert_allclose(state.mean, running_mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, running_var, rtol=1e-5)


def test_momentum_none_is_the_plain_average_of_batches():
    shape, axis, axes = LAYOUTS["nhwc"]
    state = bnjax.batch_norm_state(shape[axis])
    means, variances = [], []
    for step in range(4):
        x = _random(shape, step, loc=step, scale=step + 1.0)
        mean, var, _ = reference.numpy_moments(x, axes)
        means.append(mean)
        variances.append(var)
        _, state = bnjax.batch_norm(x, state, training=True, momentum=None)
    np.testing.assert_allclose(state.mean, np.mean(means, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, np.mean(variances, 0), rtol=1e-5)
    assert int(state.count) == 4


def test_evaluation_equals_training_when_state_holds_the_batch_statistics():
    shape, axis, _ = LAYOUTS["nhwc"]
    x = _random(shape, 3, loc=2.0, scale=3.0)
    scale, bias = _random((shape[axis],), 4), _random((shape[axis],), 5)
    y_train, state = bnjax.batch_norm(
        x, bnjax.batch_norm_state(shape[axis]), scale, bias, training=True, momentum=0.0
    )
    y_eval, _ = bnjax.batch_norm(x, state, scale, bias, training=False)
    chex.assert_trees_all_close(y_eval, y_train, atol=1e-5)


@pytest.mark.parametrize("option", ["plain", "mask", "elementwise_mask", "ghost", "nchw"])
def test_derivatives_match_autodiff_of_plain_reference(option):
    with jax.enable_x64(True):
        shape, axis, axes = LAYOUTS["nchw" if option == "nchw" else "nhwc"]
        channels = shape[axis]
        x = _random(shape, 0, loc=1.0, scale=2.0, dtype=jnp.float64)
        scale = _random((channels,), 1, loc=1.0, dtype=jnp.float64)
        bias = _random((channels,), 2, dtype=jnp.float64)
        cotangent = _random(shape, 3, dtype=jnp.float64)
        mask = None
        if option == "mask":
            # Per example, written as flax does: broadcast against (N, H, W, C).
            mask = jnp.array([True, False, True, True, False, True]).reshape(6, 1, 1, 1)
        if option == "elementwise_mask":
            mask = jax.random.bernoulli(jax.random.key(4), 0.7, shape[:-1] + (1,))
        ghost = 3 if option == "ghost" else None
        view = [1] * len(shape)
        view[axis] = channels

        def ours(x, scale, bias):
            y, _ = bnjax.batch_norm(
                x,
                bnjax.batch_norm_state(channels),
                scale,
                bias,
                training=True,
                axis=axis,
                mask=mask,
                ghost_batch_size=ghost,
            )
            return jnp.sum(jnp.sin(y) * cotangent)

        def plain(x, scale, bias):
            args = dict(epsilon=1e-5, reduction_axes=axes, mask=mask)
            if ghost:
                halves = [
                    reference.batch_norm_train(
                        part, scale.reshape(view), bias.reshape(view), **args
                    )[0]
                    for part in jnp.split(x, shape[0] // ghost)
                ]
                y = jnp.concatenate(halves)
            else:
                y = reference.batch_norm_train(x, scale.reshape(view), bias.reshape(view), **args)[
                    0
                ]
            return jnp.sum(jnp.sin(y) * cotangent)

        chex.assert_trees_all_close(ours(x, scale, bias), plain(x, scale, bias), rtol=1e-12)
        grads = jax.grad(ours, (0, 1, 2))(x, scale, bias)
        expected = jax.grad(plain, (0, 1, 2))(x, scale, bias)
        chex.assert_trees_all_close(grads, expected, rtol=1e-9, atol=1e-12)
        # Forward mode and forward-over-reverse (Hessian-vector products) work too.
        tangent = _random(shape, 5, dtype=jnp.float64)
        chex.assert_trees_all_close(
            jax.jvp(lambda x: ours(x, scale, bias), (x,), (tangent,))[1],
            jax.jvp(lambda x: plain(x, scale, bias), (x,), (tangent,))[1],
            rtol=1e-9,
        )
        hvp = jax.jvp(jax.grad(lambda x: ours(x, scale, bias)), (x,), (tangent,))[1]
        hvp_ref = jax.jvp(jax.grad(lambda x: plain(x, scale, bias)), (x,), (tangent,))[1]
        chex.assert_trees_all_close(hvp, hvp_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_check_grads_float64_both_orders_and_modes(training):
    with jax.enable_x64(True):
        x = _random((4, 2, 3), 0, loc=0.5, dtype=jnp.float64)
        scale = _random((3,), 1, loc=1.0, dtype=jnp.float64)
        bias = _random((3,), 2, dtype=jnp.float64)
        state = bnjax.batch_norm_state(3)._replace(
            mean=jnp.array([0.1, -0.2, 0.3]), var=jnp.array([0.5, 1.5, 2.0])
        )

        def f(x, scale, bias):
            return bnjax.batch_norm(x, state, scale, bias, training=training)[0]

        check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"))


def test_mean_a_thousand_times_the_std_is_within_float32_rounding():
    axes = LAYOUTS["nhwc"][2]
    x = _random((64, 8, 8, 5), 0, loc=1000.0, scale=1.0)
    mean, var, _ = reference.numpy_moments(x, axes)
    y, state = bnjax.batch_norm(x, bnjax.batch_norm_state(5), training=True, momentum=0.0)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(state.var, var, rtol=1e-4)
    expected = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y, expected, atol=1e-3)
    # The one-pass E[x^2] - E[x]^2 that this guards against (flax's default) is off by far more:
    naive = np.mean(np.square(x), axes) - np.square(np.mean(x, axes))
    assert np.max(np.abs(naive - var) / var) > 1e-2
    module = nn.BatchNorm(use_running_average=False, momentum=0.0)
    flax_stats = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])[1]
    assert np.max(np.abs(flax_stats["batch_stats"]["var"] - var) / var) > 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_keep_float32_statistics(dtype):
    # 300^2 = 90000 overflows float16 (max 65504): statistics must not be formed in float16.
    x32 = _random((16, 4, 4, 3), 0, loc=300.0, scale=20.0)
    x = x32.astype(dtype)
    y, state = bnjax.batch_norm(x, bnjax.batch_norm_state(3), training=True, momentum=0.0)
    assert y.dtype == dtype and state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32
    mean, var, _ = reference.numpy_moments(np.asarray(x, np.float32), (0, 1, 2))
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, var, rtol=1e-4)
    y32, _ = bnjax.batch_norm(
        x.astype(jnp.float32), bnjax.batch_norm_state(3), training=True, momentum=0.0
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05)
    grads = jax.grad(lambda x: jnp.sum(bnjax.batch_norm(x, state, training=True)[0] ** 2))(x)
    assert grads.dtype == dtype and bool(jnp.all(jnp.isfinite(grads)))


def test_non_finite_batch_skips_the_update_and_is_counted():
    state = bnjax.batch_norm_state(3)
    _, state = bnjax.batch_norm(_random((8, 3), 0), state, training=True)
    poisoned = _random((8, 3), 1).at[2, 1].set(jnp.nan)
    y, new_state = bnjax.batch_norm(poisoned, state, training=True)
    chex.assert_trees_all_equal(new_state.mean, state.mean)
    chex.assert_trees_all_equal(new_state.var, state.var)
    assert int(new_state.count) == 1 and int(new_state.skipped) == 1
    assert not bool(jnp.all(jnp.isfinite(y)))
    inf_batch = _random((8, 3), 2).at[0, 0].set(jnp.inf)
    _, after_inf = bnjax.batch_norm(inf_batch, new_state, training=True)
    assert int(after_inf.skipped) == 2 and bool(jnp.all(jnp.isfinite(after_inf.var)))
    # flax.linen.BatchNorm, for the README's comparison, has no such guard:
    module = nn.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), poisoned)
    flax_stats = module.apply(variables, poisoned, mutable=["batch_stats"])[1]["batch_stats"]
    assert not bool(jnp.all(jnp.isfinite(flax_stats["var"])))


def test_masked_entries_are_left_out_even_when_they_hold_nan():
    x = _random((6, 4, 3), 0, loc=2.0)
    mask = jnp.array([True, True, False, True, False, True])
    garbage = x.at[2].set(jnp.nan).at[4].set(1e30)
    y, state = bnjax.batch_norm(
        garbage, bnjax.batch_norm_state(3), training=True, momentum=0.0, mask=mask[:, None, None]
    )
    valid = x[np.asarray(mask)]
    y_valid, expected_state = bnjax.batch_norm(
        valid, bnjax.batch_norm_state(3), training=True, momentum=0.0
    )
    chex.assert_trees_all_close(y[np.asarray(mask)], y_valid, atol=1e-6)
    chex.assert_trees_all_close(state, expected_state, atol=1e-6)
    # Gradients: finite padding garbage in masked entries does not leak into valid ones (NaN
    # would, as 0 * NaN is NaN in any backward pass; the docstring says so).
    padded = x.at[2].set(1e30).at[4].set(-7.0)

    def loss(x, mask):
        y, _ = bnjax.batch_norm(x, state, training=True, mask=mask[:, None, None])
        return jnp.sum(y[np.asarray(mask)] ** 3)

    grads = jax.grad(loss)(padded, mask)
    expected = jax.grad(lambda v: loss(v, jnp.ones(4, bool)))(valid)
    chex.assert_trees_all_close(grads[np.asarray(mask)], expected, rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_all_masked_batch_is_skipped():
    x = _random((4, 3), 0)
    y, state = bnjax.batch_norm(
        x, bnjax.batch_norm_state(3), training=True, mask=jnp.zeros((4, 1), bool)
    )
    assert int(state.skipped) == 1 and int(state.count) == 0
    # Channels with no valid value normalize to 0: the output is the bias (flax gives NaN).
    assert bool(jnp.all(y == 0))


def test_ghost_batches_equal_independent_calls_per_chunk():
    x = _random((12, 2, 2, 3), 0, loc=1.0, scale=2.0)
    scale, bias = _random((3,), 1), _random((3,), 2)
    start = bnjax.batch_norm_state(3)
    y, state = bnjax.batch_norm(x, start, scale, bias, training=True, ghost_batch_size=4)
    outputs, states = [], []
    for chunk in jnp.split(x, 3):
        y_chunk, s = bnjax.batch_norm(chunk, start, scale, bias, training=True)
        outputs.append(y_chunk)
        states.append(s)
    chex.assert_trees_all_close(y, jnp.concatenate(outputs), atol=1e-6)
    chex.assert_trees_all_close(state.mean, np.mean([s.mean for s in states], 0), atol=1e-6)
    chex.assert_trees_all_close(state.var, np.mean([s.var for s in states], 0), rtol=1e-6)


def test_jit_and_eager_agree():
    x = _random((8, 4, 3), 0)
    state = bnjax.batch_norm_state(3)
    eager = bnjax.batch_norm(x, state, training=True)
    jitted = jax.jit(lambda x, s: bnjax.batch_norm(x, s, training=True))(x, state)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6)


def test_state_is_a_pytree_that_round_trips():
    state = bnjax.batch_norm_state((2, 3))
    leaves, treedef = jax.tree.flatten(state)
    assert len(leaves) == 4
    assert jax.tree.unflatten(treedef, leaves) == state
    assert state.mean.shape == (2, 3) and state.count.dtype == jnp.int32
    x = _random((5, 2, 3), 0)
    y, new_state = bnjax.batch_norm(x, state, training=True, axis=(1, 2))
    assert new_state.mean.shape == (2, 3) and y.shape == x.shape
