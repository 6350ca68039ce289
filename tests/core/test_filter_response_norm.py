"""filter_response_norm against a float64 NumPy transcription of the paper's FRN + TLU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax

NHWC = (3, 4, 5, 6)


def _normal(shape, seed=0, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _params(channels, seed=1):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, channels)
    bias = rng.normal(size=channels)
    threshold = rng.normal(size=channels) * 0.5
    return [p.astype(np.float32) for p in (scale, bias, threshold)]


def frn_reference(x, scale, bias, threshold, epsilon, learned=None, channel_axis=-1, mask=None):
    """Singh & Krishnan (2020), Sec. 3: nu2 = mean_i x_i^2 over the spatial positions of one
    example and channel; y = gamma * x / sqrt(nu2 + eps) + beta; z = max(y, tau)."""
    x = np.asarray(x, np.float64)
    channel_axis %= x.ndim
    spatial = tuple(a for a in range(1, x.ndim) if a != channel_axis)
    view = [1] * x.ndim
    view[channel_axis] = x.shape[channel_axis]
    weights = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    nu2 = (weights * x**2).sum(spatial, keepdims=True) / weights.sum(spatial, keepdims=True)
    eps = epsilon
    if learned is not None:
        learned = np.abs(np.asarray(learned, np.float64))
        eps = eps + (learned.reshape(view) if learned.size > 1 else learned.reshape(()))
    y = np.asarray(scale, np.float64).reshape(view) * x / np.sqrt(nu2 + eps)
    y = y + np.asarray(bias, np.float64).reshape(view)
    if threshold is None:
        return y
    return np.maximum(y, np.asarray(threshold, np.float64).reshape(view))


@pytest.mark.parametrize("channel_axis", [-1, 1], ids=["NHWC", "NCHW"])
def test_matches_the_paper_in_float64(channel_axis):
    x = _normal(NHWC, loc=0.7, scale=2.0)
    channels = x.shape[channel_axis]
    scale, bias, threshold = _params(channels)
    with jax.enable_x64(True):
        z = bnjax.filter_response_norm(
            jnp.asarray(x, jnp.float64), scale, bias, threshold, axis=channel_axis
        )
        assert z.dtype == jnp.float64
        np.testing.assert_allclose(
            z, frn_reference(x, scale, bias, threshold, 1e-6, channel_axis=channel_axis), rtol=1e-12
        )
    z32 = bnjax.filter_response_norm(x, scale, bias, threshold, axis=channel_axis)
    np.testing.assert_allclose(
        z32, frn_reference(x, scale, bias, threshold, 1e-6, channel_axis=channel_axis), atol=2e-6
    )


def test_without_threshold_is_the_normalization_alone_and_defaults_are_identity_params():
    x = _normal(NHWC, seed=3)
    scale, bias, _ = _params(6)
    np.testing.assert_allclose(
        bnjax.filter_response_norm(x, scale, bias),
        frn_reference(x, scale, bias, None, 1e-6),
        atol=2e-6,
    )
    np.testing.assert_allclose(
        bnjax.filter_response_norm(x),
        frn_reference(x, np.ones(6), np.zeros(6), None, 1e-6),
        atol=2e-6,
    )


@pytest.mark.parametrize("shape", [(), (6,)], ids=["scalar", "per_channel"])
def test_learned_epsilon_adds_its_absolute_value(shape):
    x = _normal(NHWC, seed=4) * 1e-3  # small activations, where epsilon matters
    scale, bias, threshold = _params(6)
    # Negative on purpose: the paper's epsilon is epsilon + |learned|.
    learned = -np.linspace(1e-6, 1e-5, 6).astype(np.float32)
    learned = learned if shape else np.float32(-5e-6)
    z = bnjax.filter_response_norm(x, scale, bias, threshold, learned_epsilon=learned)
    expected = frn_reference(x, scale, bias, threshold, 1e-6, learned)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, frn_reference(x, scale, bias, threshold, 1e-6), rtol=1e-3)


def test_dense_input_needs_the_learned_epsilon_and_works_with_it():
    x = _normal((5, 6), seed=5)
    scale, bias, threshold = _params(6)
    with pytest.raises(ValueError, match="learned_epsilon"):
        bnjax.filter_response_norm(x, scale, bias, threshold)
    with pytest.raises(ValueError, match="learned_epsilon"):  # 1x1 maps are the same case
        bnjax.filter_response_norm(x.reshape(5, 1, 1, 6), scale, bias, threshold)
    z = bnjax.filter_response_norm(x, scale, bias, threshold, learned_epsilon=jnp.asarray(0.5))
    np.testing.assert_allclose(z, frn_reference(x, scale, bias, threshold, 1e-6, 0.5), atol=2e-6)


def test_an_example_does_not_depend_on_the_rest_of_its_batch():
    x = _normal(NHWC, seed=6)
    scale, bias, threshold = _params(6)
    others = _normal(NHWC, seed=7, loc=5.0, scale=10.0)
    mixed = np.concatenate([x[:1], others[1:]])
    a = bnjax.filter_response_norm(x, scale, bias, threshold)
    b = bnjax.filter_response_norm(mixed, scale, bias, threshold)
    c = bnjax.filter_response_norm(x[:1], scale, bias, threshold)
    chex.assert_trees_all_equal(a[0], b[0])
    chex.assert_trees_all_close(a[:1], c, atol=1e-7)


def test_mask_leaves_positions_out_of_the_mean_square():
    x = _normal(NHWC, seed=8)
    mask = np.random.default_rng(9).random(NHWC[:3] + (1,)) > 0.3
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    scale, bias, threshold = _params(6)
    z = bnjax.filter_response_norm(poisoned, scale, bias, threshold, mask=mask)
    expected = frn_reference(x, scale, bias, threshold, 1e-6, mask=mask)
    np.testing.assert_allclose(np.where(mask, z, 0), np.where(mask, expected, 0), atol=2e-6)


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gradients_in_float64(order):
    x = _normal((2, 3, 3, 4), seed=10, loc=0.3)
    scale, bias, threshold = _params(4)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, threshold)]
        learned = jnp.asarray([0.02, 0.03, 0.01, 0.05], jnp.float64)

        def f(x, scale, bias, threshold, learned):
            return bnjax.filter_response_norm(
                x, scale, bias, threshold, epsilon=1e-3, learned_epsilon=learned
            )

        check_grads(jax.jit(f), (*args, learned), order=order, modes=("fwd", "rev"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_has_float32_statistics(dtype):
    # x^2 of 1000 overflows float16 (max 65504): the mean square must be float32.
    x = _normal(NHWC, seed=11, scale=1000.0)
    scale, bias, threshold = _params(6)
    low = jnp.asarray(x, dtype)
    z = bnjax.filter_response_norm(low, scale, bias, threshold)
    assert z.dtype == dtype
    expected = frn_reference(np.asarray(low, np.float64), scale, bias, threshold, 1e-6)
    np.testing.assert_allclose(np.asarray(z, np.float64), expected, rtol=2e-2, atol=2e-2)


def test_axis_name_merges_the_mean_square_of_a_split_example():
    """Devices holding parts of each example (here: rows of the image) give the whole."""
    x = _normal((2, 8, 3, 4), seed=12)
    scale, bias, threshold = _params(4)
    whole = bnjax.filter_response_norm(x, scale, bias, threshold)
    parts = jnp.moveaxis(jnp.asarray(x).reshape(2, 4, 2, 3, 4), 1, 0)  # 4 devices, 2 rows each
    mapped = jax.vmap(
        lambda part: bnjax.filter_response_norm(part, scale, bias, threshold, axis_name="rows"),
        axis_name="rows",
    )(parts)
    chex.assert_trees_all_close(jnp.moveaxis(mapped, 0, 1).reshape(x.shape), whole, atol=1e-6)


def test_bad_inputs_are_refused_naming_the_argument():
    x = _normal(NHWC)
    scale, bias, threshold = _params(6)
    with pytest.raises(ValueError, match="`threshold` has shape"):
        bnjax.filter_response_norm(x, scale, bias, threshold[:3])
    with pytest.raises(TypeError, match="`x` is complex"):
        bnjax.filter_response_norm(x.astype(np.complex64))
    with pytest.raises(TypeError, match="`x` must have a floating"):
        bnjax.filter_response_norm(np.ones(NHWC, np.int32))
    with pytest.raises(ValueError, match="batch axis 0"):
        bnjax.filter_response_norm(x, axis=0)
    with pytest.raises(ValueError, match="`epsilon`"):
        bnjax.filter_response_norm(x, epsilon=0.0)
    with pytest.raises(ValueError, match="`learned_epsilon` must be a scalar"):
        bnjax.filter_response_norm(x, learned_epsilon=jnp.ones(3))
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\., C\)"):
        bnjax.filter_response_norm(x[0, 0, 0])
