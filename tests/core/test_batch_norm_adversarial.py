"""Batch-norm training statistics and output on inputs that break one-pass or shifted formulas.

Each case is compared with a float64 NumPy computation of the paper's formula on the same
float32 values: |mean| = 1000 std, an outlier as the first value of a channel (the shift of a
one-pass shifted sum, or of the cross-device merge), and a constant channel (variance 0).
With ``momentum=0`` the returned running statistics are the batch's mean and biased variance.

Every test also checks that its tolerance separates the exact result from the one-pass
``E[x^2] - E[x]^2`` in float32 (flax's default), so it would catch a regression to it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

EPSILON = 1e-5
DEVICES = 8
SHAPE = (64, 4, 4, 3)  # 1024 values per channel
AXES = (0, 1, 2)


def _float64_reference(x, scale, bias, mask=None):
    """mean, biased var (per channel) and y = scale (x - mean) / sqrt(var + eps) + bias."""
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    count = valid.sum(axis=AXES)
    mean = np.where(valid, x, 0).sum(axis=AXES) / count
    var = np.where(valid, (x - mean) ** 2, 0).sum(axis=AXES) / count
    y = scale * (x - mean) / np.sqrt(var + EPSILON) + bias
    return mean, var, y


def _one_pass_float32_var(x):
    """flax's default: E[x^2] - E[x]^2, in float32."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.mean(x * x, axis=AXES) - jnp.square(jnp.mean(x, axis=AXES))


def _train(x, scale, bias, mask=None):
    y, state = jax.jit(
        lambda x, mask: bnjax.batch_norm(
            x,
            bnjax.batch_norm_state(x.shape[-1]),
            scale,
            bias,
            training=True,
            momentum=0.0,
            epsilon=EPSILON,
            mask=mask,
        )
    )(x, mask)
    return np.asarray(state.mean), np.asarray(state.var), np.asarray(y)


def _params(channels):
    rng = np.random.default_rng(1)
    scale = (1.0 + 0.2 * rng.normal(size=channels)).astype(np.float32)
    bias = (0.1 * rng.normal(size=channels)).astype(np.float32)
    return scale, bias


def _far_from_zero(seed=0):
    """Channels with mean +1000, -1000 and 3000 times their std (std 1, 0.5 and 2)."""
    rng = np.random.default_rng(seed)
    std = np.array([1.0, 0.5, 2.0])
    loc = np.array([1000.0, -1000.0, 3000.0]) * std
    return (loc + std * rng.normal(size=SHAPE)).astype(np.float32)


def _with_first_outlier(x, sizes_in_std=(100.0, -100.0, 300.0)):
    """x with the first value of every channel (and of every device's shard) far out."""
    x = x.copy()
    std = x.std(axis=AXES)
    for start in range(0, SHAPE[0], SHAPE[0] // DEVICES):
        x[start, 0, 0] = x.mean(axis=AXES) + np.asarray(sizes_in_std) * std
    return x


@pytest.mark.parametrize("masked", [False, True])
def test_mean_1000_times_std(masked):
    x = _far_from_zero()
    mask = None
    if masked:  # leave a quarter of the examples out, with garbage in them
        mask = (np.arange(SHAPE[0]) % 4 != 1).reshape(-1, 1, 1, 1)
        x = np.where(mask, x, np.float32(1e30))
    scale, bias = _params(SHAPE[-1])
    mean, var, y = _train(x, scale, bias, mask)
    mean_64, var_64, y_64 = _float64_reference(x, scale, bias, mask)
    np.testing.assert_allclose(var, var_64, rtol=1e-5)
    # The mean is summed around a value of the data: about an ulp of |mean|.
    np.testing.assert_allclose(mean, mean_64, rtol=2.5e-7)
    valid = np.broadcast_to(True if mask is None else mask, x.shape)
    # y is off by at most a few float32 ulps of |mean| (the rounding of the mean), over std.
    np.testing.assert_allclose(y[valid], y_64[valid], atol=5e-4)
    if not masked:
        assert not np.allclose(_one_pass_float32_var(x), var_64, rtol=1e-5)


def test_outlier_as_the_first_value():
    x = _with_first_outlier(_far_from_zero(seed=2))
    scale, bias = _params(SHAPE[-1])
    mean, var, y = _train(x, scale, bias)
    mean_64, var_64, y_64 = _float64_reference(x, scale, bias)
    np.testing.assert_allclose(var, var_64, rtol=1e-5)
    np.testing.assert_allclose(mean, mean_64, rtol=2.5e-7)
    np.testing.assert_allclose(y, y_64, atol=5e-4, rtol=1e-5)
    assert not np.allclose(_one_pass_float32_var(x), var_64, rtol=1e-5)
    # Shifting by the first value (the outlier) would not make the one-pass formula exact.
    assert not np.allclose(_one_pass_float32_var(x - x[:1, :1, :1]), var_64, rtol=1e-5)


def test_constant_channel_has_variance_zero_to_float32_rounding():
    rng = np.random.default_rng(3)
    x = rng.normal(size=SHAPE).astype(np.float32)
    x[..., 0] = np.float32(1000.1)  # not a sum of exact float32 multiples: rounding happens
    x[..., 1] = np.float32(-0.3)
    scale, bias = _params(SHAPE[-1])
    mean, var, y = _train(x, scale, bias)
    mean_64, var_64, y_64 = _float64_reference(x, scale, bias)
    assert var_64[0] == var_64[1] == 0
    ulp = np.spacing(np.abs(x[0, 0, 0, :2]))
    # The mean is the constant to a few ulps, so the variance is at most a few ulps squared.
    np.testing.assert_array_less(np.abs(mean[:2] - mean_64[:2]), 4 * ulp)
    np.testing.assert_array_less(var[:2], (4 * ulp) ** 2)
    # y = bias up to those ulps times scale / sqrt(epsilon).
    np.testing.assert_allclose(
        y[..., :2], y_64[..., :2], atol=float(4 * ulp.max() * 1.5 / np.sqrt(EPSILON))
    )
    np.testing.assert_allclose(var[2], var_64[2], rtol=1e-5)
    one_pass = np.asarray(_one_pass_float32_var(x))
    assert not np.all(np.abs(one_pass[:2]) < (4 * ulp) ** 2)


def test_synced_over_devices_with_outliers_first_on_every_device():
    """The cross-device merge shifts by each device's first value: outliers there too."""
    x = _with_first_outlier(_far_from_zero(seed=4))
    scale, bias = _params(SHAPE[-1])
    mesh = jax.make_mesh((DEVICES,), ("batch",))

    def step(x):
        y, state = bnjax.batch_norm(
            x,
            bnjax.batch_norm_state(SHAPE[-1]),
            scale,
            bias,
            training=True,
            momentum=0.0,
            epsilon=EPSILON,
            axis_name="batch",
        )
        return y, state

    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P())))
    y, state = run(jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("batch"))))
    mean_64, var_64, y_64 = _float64_reference(x, scale, bias)
    np.testing.assert_allclose(np.asarray(state.var), var_64, rtol=1e-5)
    # The merge rounds shift + offset once more: a few ulps of |mean|.
    np.testing.assert_allclose(np.asarray(state.mean), mean_64, rtol=5e-7)
    np.testing.assert_allclose(np.asarray(y), y_64, atol=5e-4, rtol=1e-5)
