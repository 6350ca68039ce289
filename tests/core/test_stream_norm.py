"""Test-time batch renormalization (DELTA's TBR) and streaming population statistics, against
float64 references written from the equations (DELTA Sec. 3.2; Chan et al.'s merge)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):  # the references are float64
        yield


def _x(seed, shape=(6, 3, 3, 4), loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, shape)


def tbr_reference(x, mean_ema, std_ema, scale, bias, momentum, epsilon):
    """DELTA's TBR in float64 NumPy: value, and the new moving averages."""
    axes = tuple(range(x.ndim - 1))
    mu_b = x.mean(axes)
    sigma_b = np.sqrt(x.var(axes) + epsilon)
    r = sigma_b / std_ema
    d = (mu_b - mean_ema) / std_ema
    x_hat = (x - mu_b) / sigma_b * r + d
    y = scale * x_hat + bias
    return (
        y,
        momentum * mean_ema + (1 - momentum) * mu_b,
        momentum * std_ema + (1 - momentum) * sigma_b,
    )


def test_tbr_matches_the_equations_and_normalizes_by_the_moving_statistics():
    x = _x(0, loc=2.0, scale=3.0)
    mean, var = np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.0, 4.0, 0.25, 9.0])
    scale, bias = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.0, 1.0, -1.0, 0.5])
    eps, momentum = 1e-3, 0.9
    state = bnjax.stream_renorm_state_from(mean, var, epsilon=eps)
    y, new = bnjax.stream_batch_renorm(
        jnp.asarray(x), state, jnp.asarray(scale), jnp.asarray(bias), momentum=momentum, epsilon=eps
    )
    std = np.sqrt(var + eps)
    want_y, want_mean, want_std = tbr_reference(x, mean, std, scale, bias, momentum, eps)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    # r and d make the forward value the moving statistics' normalization, whatever the batch.
    np.testing.assert_allclose(y, scale * (x - mean) / std + bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(new.std, want_std, rtol=1e-12)
    assert int(new.count) == 2


def test_tbr_gradient_is_batch_norm_gradient_scaled_by_r():
    """With r and d stop-gradient, dy/dx = r * (batch norm's dy/dx): check against autodiff of
    the float64 reference with r and d held constant."""
    x = _x(1, shape=(8, 4), loc=1.0, scale=2.0)
    mean, var, eps = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 2.0, 3.0, 0.5]), 1e-5
    state = bnjax.stream_renorm_state_from(mean, var, epsilon=eps)
    weights = _x(2, shape=(8, 4))
    std = np.sqrt(var + eps)

    def ours(x):
        y, _ = bnjax.stream_batch_renorm(x, state, epsilon=eps)
        return jnp.sum(y * weights)

    def reference(x):
        mu_b = x.mean(0)
        sigma_b = jnp.sqrt(x.var(0) + eps)
        r = jax.lax.stop_gradient(sigma_b) / std
        d = (jax.lax.stop_gradient(mu_b) - mean) / std
        return jnp.sum(((x - mu_b) / sigma_b * r + d) * weights)

    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-10, atol=1e-12)
    # Finite differences see the value (x - mu_ema) / sigma_ema, not the stop-gradient rule, so
    # `check_grads` does not apply; forward and reverse mode must agree: <J t, w> = <t, J^T w>.
    tangent = _x(6, shape=(8, 4))

    def y_of(x):
        return bnjax.stream_batch_renorm(x, state, epsilon=eps)[0]

    _, forward = jax.jvp(y_of, (jnp.asarray(x),), (jnp.asarray(tangent),))
    (backward,) = jax.vjp(y_of, jnp.asarray(x))[1](jnp.asarray(weights))
    np.testing.assert_allclose(np.sum(forward * weights), np.sum(tangent * backward), rtol=1e-10)


def test_tbr_first_batch_initializes_an_empty_state_like_batch_norm():
    x = jnp.asarray(_x(3, loc=-1.0, scale=0.5))
    y, state = bnjax.stream_batch_renorm(x, bnjax.stream_renorm_state(4), epsilon=1e-5)
    want, _ = bnjax.batch_norm(x, bnjax.batch_norm_state(4), training=True, epsilon=1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state.mean, np.asarray(x).mean((0, 1, 2)), rtol=1e-12)
    assert int(state.count) == 1


def test_tbr_skips_a_non_finite_batch():
    state = bnjax.stream_renorm_state_from(np.zeros(4), np.ones(4))
    x = _x(4)
    x[0, 0, 0, 1] = np.nan
    _, new = bnjax.stream_batch_renorm(jnp.asarray(x), state)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.std, state.std)
    assert int(new.count) == int(state.count)


def test_tbr_masked_values_do_not_enter_the_statistics():
    x = _x(5, shape=(10, 2))
    mask = np.arange(10) < 6
    state = bnjax.stream_renorm_state_from(np.zeros(2), np.ones(2), epsilon=1e-5)
    _, masked = bnjax.stream_batch_renorm(x, state, mask=mask[:, None], momentum=0.5)
    _, alone = bnjax.stream_batch_renorm(x[:6], state, momentum=0.5)
    np.testing.assert_allclose(masked.mean, alone.mean, rtol=1e-12)
    np.testing.assert_allclose(masked.std, alone.std, rtol=1e-12)


def test_streaming_population_equals_the_concatenated_statistics():
    batches = [_x(10 + i, shape=(5, 2, 2, 3), loc=i, scale=1 + i) for i in range(4)]
    state = bnjax.streaming_population_state(num_features=3)
    for i, batch in enumerate(batches):
        y, state = bnjax.streaming_population_norm(jnp.asarray(batch), state, epsilon=1e-5)
        seen = np.concatenate(batches[: i + 1]).reshape(-1, 3)
        np.testing.assert_allclose(state.mean, seen.mean(0), rtol=1e-10)
        np.testing.assert_allclose(state.variance(), seen.var(0), rtol=1e-10)
        np.testing.assert_allclose(
            y, (batch - seen.mean(0)) / np.sqrt(seen.var(0) + 1e-5), rtol=1e-9, atol=1e-9
        )


def test_streaming_population_prior_is_the_mixture_with_the_source():
    mean, var, n0 = np.array([1.0, -2.0]), np.array([4.0, 0.5]), 50.0
    x = _x(20, shape=(30, 2), loc=3.0)
    state = bnjax.streaming_population_state(mean, var, prior_count=n0)
    _, state = bnjax.streaming_population_norm(jnp.asarray(x), state)
    n = 30
    want_mean = (n0 * mean + n * x.mean(0)) / (n0 + n)
    want_var = (n0 * var + n * x.var(0) + n0 * n / (n0 + n) * (mean - x.mean(0)) ** 2) / (n0 + n)
    np.testing.assert_allclose(state.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(state.variance(), want_var, rtol=1e-12)


def test_float32_statistics_for_bfloat16_inputs():
    x = jnp.asarray(_x(30, loc=100.0), jnp.bfloat16)
    state = bnjax.stream_renorm_state(4, dtype=jnp.float32)
    y, state = bnjax.stream_batch_renorm(x, state)
    assert y.dtype == jnp.bfloat16 and state.mean.dtype == jnp.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: bnjax.stream_batch_renorm(jnp.ones((4, 3)), bnjax.stream_renorm_state(2)),
            "features",
        ),
        (
            lambda: bnjax.stream_batch_renorm(
                jnp.ones((4, 3)), bnjax.stream_renorm_state(3), momentum=1.5
            ),
            "momentum",
        ),
        (lambda: bnjax.stream_renorm_state_from(jnp.ones(3), jnp.ones(2)), "same"),
        (lambda: bnjax.streaming_population_state(jnp.ones(3)), "var"),
        (lambda: bnjax.streaming_population_state(), "num_features"),
        (
            lambda: bnjax.streaming_population_state(jnp.ones(2), jnp.ones(2), prior_count=-1.0),
            "prior_count",
        ),
    ],
)
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
