"""Tests for the stateless normalizers: group_norm, layer_norm, instance_norm."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from bnjax.core.group_norm import group_norm, instance_norm, layer_norm, rms_norm

NHWC = (2, 3, 4, 8)


def _normal(shape, seed=0, loc=0.0, scale=1.0, dtype=np.float32):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _affine_params(channels, seed=1):
    """Non-trivial scale and bias values, so a swapped or ignored parameter shows."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    return scale, bias


# --------------------------------------------------------------------------------------------
# Agreement with flax.linen on NHWC inputs.
# --------------------------------------------------------------------------------------------

# name -> (flax module factory taking the common options, bnjax function taking (x, s, b, eps))
_FLAX_CASES = {
    "group_norm_num_groups": (
        lambda **kw: nn.GroupNorm(num_groups=4, **kw),
        lambda x, s, b, eps: group_norm(x, s, b, num_groups=4, epsilon=eps),
    ),
    "group_norm_group_size": (
        lambda **kw: nn.GroupNorm(num_groups=None, group_size=2, **kw),
        lambda x, s, b, eps: group_norm(x, s, b, num_groups=None, group_size=2, epsilon=eps),
    ),
    "layer_norm": (
        lambda **kw: nn.LayerNorm(**kw),
        lambda x, s, b, eps: layer_norm(x, s, b, epsilon=eps),
    ),
    "layer_norm_whole_map": (
        lambda **kw: nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, **kw),
        lambda x, s, b, eps: layer_norm(
            x, s, b, epsilon=eps, reduction_axes=(1, 2, 3), feature_axes=-1
        ),
    ),
    "instance_norm": (
        lambda **kw: nn.InstanceNorm(**kw),
        lambda x, s, b, eps: instance_norm(x, s, b, epsilon=eps),
    ),
}


@pytest.mark.parametrize("case", sorted(_FLAX_CASES))
@pytest.mark.parametrize(
    ("use_scale", "use_bias", "epsilon"),
    [(True, True, 1e-5), (False, False, 1e-3), (True, False, 1e-6)],
)
def test_matches_flax(case, use_scale, use_bias, epsilon):
    make_flax, ours = _FLAX_CASES[case]
    x = jnp.asarray(_normal(NHWC, loc=0.5, scale=2.0))
    scale, bias = _affine_params(NHWC[-1])
    module = make_flax(
        epsilon=epsilon, use_scale=use_scale, use_bias=use_bias, use_fast_variance=False
    )
    params = {}
    if use_scale:
        params["scale"] = jnp.asarray(scale)
    if use_bias:
        params["bias"] = jnp.asarray(bias)
    # The flax parameters must have the shapes we substitute.
    initial = module.init(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes(initial.get("params", {}), params)
    expected = module.apply({"params": params}, x)

    actual = ours(
        x,
        jnp.asarray(scale) if use_scale else None,
        jnp.asarray(bias) if use_bias else None,
        epsilon,
    )
    assert actual.dtype == x.dtype
    chex.assert_trees_all_close(actual, expected, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Float64 numpy reference for NCHW group norm.
# --------------------------------------------------------------------------------------------


def _numpy_group_norm_nchw(x, scale, bias, num_groups, epsilon):
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, -1)
    mean = grouped.mean(axis=-1, keepdims=True)
    var = np.square(grouped - mean).mean(axis=-1, keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    view = (1, c) + (1,) * (x.ndim - 2)
    return y * np.reshape(scale, view).astype(np.float64) + np.reshape(bias, view).astype(
        np.float64
    )


@pytest.mark.parametrize("num_groups", [1, 3, 6])
def test_group_norm_nchw_matches_numpy(num_groups):
    shape = (2, 6, 3, 5)
    x = _normal(shape, seed=2, loc=-1.0, scale=3.0)
    scale, bias = _affine_params(shape[1], seed=3)
    expected = _numpy_group_norm_nchw(x, scale, bias, num_groups, 1e-5)

    actual = group_norm(x, scale, bias, num_groups=num_groups, epsilon=1e-5, axis=1)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5, rtol=1e-5)

    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        actual64 = group_norm(
            x64,
            jnp.asarray(scale, jnp.float64),
            jnp.asarray(bias, jnp.float64),
            num_groups=num_groups,
            epsilon=1e-5,
            axis=1,
        )
        assert actual64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(actual64), expected, atol=1e-12, rtol=1e-12)


def test_group_norm_axis_minus_one_equals_nchw_transposed():
    x = _normal((2, 6, 3, 5), seed=4)
    scale, bias = _affine_params(6, seed=5)
    nchw = group_norm(x, scale, bias, num_groups=3, axis=1)
    nhwc = group_norm(np.moveaxis(x, 1, -1), scale, bias, num_groups=3, axis=-1)
    chex.assert_trees_all_close(jnp.moveaxis(nhwc, -1, 1), nchw, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Gradients (float64, orders 1 and 2, forward and reverse mode).
# --------------------------------------------------------------------------------------------

_GRAD_CASES = {
    "group_norm": (
        (2, 2, 3, 4),
        lambda x, s, b: group_norm(x, s, b, num_groups=2, epsilon=1e-3),
    ),
    "layer_norm": ((3, 5), lambda x, s, b: layer_norm(x, s, b, epsilon=1e-3)),
    "instance_norm": ((2, 2, 3, 3), lambda x, s, b: instance_norm(x, s, b, epsilon=1e-3)),
}


@pytest.mark.parametrize("case", sorted(_GRAD_CASES))
def test_check_grads_float64(case):
    shape, fn = _GRAD_CASES[case]
    scale, bias = _affine_params(shape[-1], seed=6)
    with jax.enable_x64(True):
        x = jnp.asarray(_normal(shape, seed=7, loc=0.3, scale=1.5, dtype=np.float64))
        s = jnp.asarray(scale, jnp.float64)
        b = jnp.asarray(bias, jnp.float64)
        # jit: a few whole-program compiles are cheaper than many per-op ones.
        jitted = jax.jit(fn)
        assert jitted(x, s, b).dtype == jnp.float64
        check_grads(jitted, (x, s, b), order=2, modes=("fwd", "rev"))


# --------------------------------------------------------------------------------------------
# Numerical stability: mean a thousand times the standard deviation.
# --------------------------------------------------------------------------------------------


def _numpy_standardize(x, axes, epsilon):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon)


def _naive_float32_standardize(x, axes, epsilon):
    """The textbook E[x^2] - E[x]^2 in float32: what a stable implementation must beat."""
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x), axis=axes, keepdims=True) - jnp.square(mean)
    return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, 0.0) + epsilon)


@pytest.mark.parametrize(
    ("name", "fn", "axes"),
    [
        ("group_norm", lambda x: group_norm(x, num_groups=1), (1, 2, 3)),
        ("layer_norm", lambda x: layer_norm(x, reduction_axes=(1, 2, 3)), (1, 2, 3)),
        ("instance_norm", instance_norm, (1, 2)),
    ],
)
def test_stable_when_mean_is_1000_times_std(name, fn, axes):
    # float32 input; the reference is float64 arithmetic on exactly these float32 values, so
    # only the normalizer's own rounding counts.
    x = _normal((2, 8, 8, 4), seed=8, loc=1000.0, scale=1.0)
    expected = _numpy_standardize(x, axes, 1e-6)

    actual = np.asarray(fn(jnp.asarray(x)))
    error = np.abs(actual - expected).max()
    assert error < 1e-3, f"{name}: max error {error} against the float64 reference"

    naive_error = np.abs(np.asarray(_naive_float32_standardize(x, axes, 1e-6)) - expected).max()
    # The naive formula loses most digits of the variance here; the test data must show it.
    assert naive_error > 30 * error, (naive_error, error)


# --------------------------------------------------------------------------------------------
# Half-precision inputs.
# --------------------------------------------------------------------------------------------

_HALF_FNS = {
    "group_norm": lambda x, s, b: group_norm(x, s, b, num_groups=2),
    "layer_norm": lambda x, s, b: layer_norm(x, s, b),
    "instance_norm": lambda x, s, b: instance_norm(x, s, b),
}


@pytest.mark.parametrize("name", sorted(_HALF_FNS))
@pytest.mark.parametrize(("dtype", "atol"), [(jnp.bfloat16, 5e-2), (jnp.float16, 1e-2)])
def test_half_precision_dtype_and_values(name, dtype, atol):
    fn = _HALF_FNS[name]
    scale, bias = _affine_params(8, seed=9)
    x_half = jnp.asarray(_normal((2, 4, 4, 8), seed=10, loc=2.0, scale=3.0), dtype)
    actual = fn(x_half, scale, bias)
    assert actual.dtype == dtype
    # Reference: float32 computation on the same (already rounded) values.
    expected = fn(x_half.astype(jnp.float32), scale, bias)
    chex.assert_trees_all_close(actual.astype(jnp.float32), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("name", sorted(_HALF_FNS))
def test_float16_large_values_do_not_overflow(name):
    fn = _HALF_FNS[name]
    # |x| ~ 400: x^2 ~ 1.6e5 exceeds the float16 maximum 65504, and so does any sum of x.
    x_half = jnp.asarray(_normal((2, 4, 4, 8), seed=11, loc=400.0, scale=20.0), jnp.float16)
    assert not jnp.isfinite(jnp.square(x_half)).any()
    scale, bias = _affine_params(8, seed=12)
    actual = fn(x_half, scale, bias)
    assert actual.dtype == jnp.float16
    assert np.isfinite(np.asarray(actual, np.float32)).all()
    expected = fn(x_half.astype(jnp.float32), scale, bias)
    chex.assert_trees_all_close(actual.astype(jnp.float32), expected, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# Bad input: the error names the argument.
# --------------------------------------------------------------------------------------------

_X = jnp.ones(NHWC)
_C8 = jnp.ones((8,))
_C4 = jnp.ones((4,))

_BAD_INPUTS = {
    "gn_integer_x": (lambda: group_norm(jnp.ones(NHWC, jnp.int32), num_groups=2), TypeError, "`x`"),
    "ln_integer_x": (lambda: layer_norm(jnp.ones(NHWC, jnp.int32)), TypeError, "`x`"),
    "in_integer_x": (lambda: instance_norm(jnp.ones(NHWC, jnp.int32)), TypeError, "`x`"),
    "gn_integer_scale": (
        lambda: group_norm(_X, jnp.ones((8,), jnp.int32), num_groups=2),
        TypeError,
        "`scale`",
    ),
    "gn_num_groups_not_dividing": (
        lambda: group_norm(_X, num_groups=3),
        ValueError,
        "`num_groups`=3 must divide the 8 channels",
    ),
    "gn_num_groups_zero": (lambda: group_norm(_X, num_groups=0), ValueError, "`num_groups`=0"),
    "gn_num_groups_float": (
        lambda: group_norm(_X, num_groups=2.0),
        TypeError,
        "`num_groups` must be an int",
    ),
    "ln_numpy_negative_epsilon": (
        lambda: layer_norm(_X, epsilon=np.float32(-1.0)),
        ValueError,
        "`epsilon` must be >= 0",
    ),
    "gn_group_size_not_dividing": (
        lambda: group_norm(_X, num_groups=None, group_size=3),
        ValueError,
        "`group_size`=3 must divide the 8 channels",
    ),
    "gn_both_groups_and_size": (
        lambda: group_norm(_X, num_groups=2, group_size=4),
        ValueError,
        "exactly one of `num_groups` and `group_size`",
    ),
    "gn_neither_groups_nor_size": (
        lambda: group_norm(_X, num_groups=None, group_size=None),
        ValueError,
        "exactly one of `num_groups` and `group_size`",
    ),
    "gn_scale_wrong_shape": (
        lambda: group_norm(_X, _C4, _C8, num_groups=2),
        ValueError,
        r"`scale` has shape \(4,\)",
    ),
    "gn_bias_wrong_shape": (
        lambda: group_norm(_X, _C8, _C4, num_groups=2),
        ValueError,
        r"`bias` has shape \(4,\)",
    ),
    "ln_scale_wrong_shape": (lambda: layer_norm(_X, _C4), ValueError, "`scale` has shape"),
    "in_bias_wrong_shape": (lambda: instance_norm(_X, None, _C4), ValueError, "`bias`"),
    "gn_axis_out_of_range": (
        lambda: group_norm(_X, num_groups=2, axis=4),
        ValueError,
        "`axis`=4 is out of range",
    ),
    "gn_axis_is_batch": (lambda: group_norm(_X, num_groups=1, axis=0), ValueError, "`axis`"),
    "in_axis_out_of_range": (lambda: instance_norm(_X, axis=-5), ValueError, "`axis`=-5"),
    "ln_reduction_axes_out_of_range": (
        lambda: layer_norm(_X, reduction_axes=(1, 4)),
        ValueError,
        "`reduction_axes`",
    ),
    "ln_feature_axes_out_of_range": (
        lambda: layer_norm(_X, feature_axes=7),
        ValueError,
        "`feature_axes`=7",
    ),
    "gn_negative_epsilon": (
        lambda: group_norm(_X, num_groups=2, epsilon=-1e-5),
        ValueError,
        "`epsilon` must be >= 0",
    ),
    "ln_negative_epsilon": (lambda: layer_norm(_X, epsilon=-1.0), ValueError, "`epsilon`"),
    "in_negative_epsilon": (lambda: instance_norm(_X, epsilon=-1e-3), ValueError, "`epsilon`"),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_bad_input_error_names_the_argument(case):
    call, error_type, message = _BAD_INPUTS[case]
    with pytest.raises(error_type, match=message):
        call()


def test_group_norm_group_size_and_num_groups_agree():
    x = _normal(NHWC, seed=13)
    chex.assert_trees_all_close(
        group_norm(x, num_groups=None, group_size=2), group_norm(x, num_groups=4)
    )


def test_output_statistics_are_standard():
    x = _normal((3, 4, 4, 6), seed=14, loc=5.0, scale=4.0)
    # epsilon 1e-30 vanishes next to the variance in float32 (0 itself is refused).
    y = np.asarray(group_norm(x, num_groups=3, epsilon=1e-30), np.float64)
    grouped = y.reshape(3, 16, 3, 2)
    np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(grouped.std(axis=(1, 3)), 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# No state: deterministic, and jit / no-jit agree.
# --------------------------------------------------------------------------------------------


class StatelessTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("group_norm", functools.partial(group_norm, num_groups=2, epsilon=1e-5)),
        ("layer_norm", functools.partial(layer_norm, reduction_axes=(1, 2, 3))),
        ("instance_norm", instance_norm),
    )
    def test_deterministic_and_jit_agnostic(self, fn):
        x = jnp.asarray(_normal((2, 3, 3, 4), seed=15, loc=1.0, scale=2.0))
        scale, bias = (jnp.asarray(p) for p in _affine_params(4, seed=16))
        variant_fn = self.variant(fn)
        first = variant_fn(x, scale, bias)
        second = variant_fn(x, scale, bias)
        # Same input, same output, bit for bit: nothing is carried between calls.
        chex.assert_trees_all_equal(first, second)
        chex.assert_trees_all_close(first, fn(x, scale, bias), atol=1e-6, rtol=1e-6)
        # The input is not modified.
        chex.assert_trees_all_equal(
            x, jnp.asarray(_normal((2, 3, 3, 4), seed=15, loc=1.0, scale=2.0))
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda: instance_norm(jnp.arange(8.0).reshape(2, 4), bias=jnp.full(4, 0.5)),
        lambda: group_norm(jnp.arange(8.0).reshape(2, 4), bias=jnp.full(4, 0.5), num_groups=4),
        lambda: layer_norm(jnp.arange(8.0).reshape(2, 4, 1), bias=jnp.full(1, 0.5)),
    ],
    ids=["in_without_spatial_axes", "gn_single_value_groups", "ln_size_one_axis"],
)
def test_single_value_statistics_follow_flax_with_a_warning(call):
    """As flax: each statistic from one value gives the bias alone; bnjax also warns."""
    with pytest.warns(UserWarning, match="single value"):
        y = call()
    np.testing.assert_array_equal(y, np.full(y.shape, 0.5, np.float32))


# --- masks and devices, as flax's modules take them -----------------------------------------


def _split_features(x, devices):
    """(N, T, C) -> (devices, N, T / devices, C): each device holds part of every example."""
    n, t, c = x.shape
    return jnp.moveaxis(x.reshape(n, devices, t // devices, c), 1, 0)


@pytest.mark.parametrize(
    "name, call",
    [
        ("layer", lambda x, **kw: layer_norm(x, reduction_axes=(1, 2), **kw)),
        ("group", lambda x, **kw: group_norm(x, num_groups=2, **kw)),
        ("instance", lambda x, **kw: instance_norm(x, **kw)),
        ("rms", lambda x, **kw: rms_norm(x, reduction_axes=(1, 2), **kw)),
    ],
)
def test_axis_name_merges_exactly_with_ragged_masks(name, call):
    """Devices holding different numbers of valid values of each example (sequence
    parallelism with padding) give the statistics of the whole example on one device, also at
    |mean| = 1000 std, where a merge of E[x] and E[x^2] would lose every digit."""
    devices, shape = 4, (3, 8, 4)
    x = np.random.default_rng(0).normal(1000.0, 1.0, shape).astype(np.float32)
    mask = np.random.default_rng(1).random(shape[:2] + (1,)) < 0.6
    mask[:, :2] = True  # device 0 holds two valid positions of every example,
    mask[:, 2:4] = False  # device 1 none at all
    whole = call(jnp.asarray(x), mask=mask)
    mapped = jax.vmap(lambda xs, ms: call(xs, mask=ms, axis_name="devices"), axis_name="devices")(
        _split_features(jnp.asarray(x), devices), _split_features(mask, devices)
    )
    got = jnp.moveaxis(mapped, 0, 1).reshape(shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-3, atol=1e-3)
    x64 = x.astype(np.float64)
    if name == "layer":  # and against float64 arithmetic
        valid = np.broadcast_to(mask, shape)
        mean = np.array([x64[i][valid[i]].mean() for i in range(3)])[:, None, None]
        var = np.array([x64[i][valid[i]].var() for i in range(3)])[:, None, None]
        np.testing.assert_allclose(
            np.asarray(got), (x64 - mean) / np.sqrt(var + 1e-6), rtol=1e-3, atol=1e-3
        )


def test_per_example_masks_are_written_as_in_flax():
    """(N,) with x (N, T, C) does not broadcast: the error shows the flax form."""
    x = jnp.ones((4, 3, 2))
    with pytest.raises(ValueError, match=r"mask.reshape\(4, 1, 1\)"):
        layer_norm(x, mask=jnp.ones(4, bool))
    padded = jnp.array([True, True, False, True])[:, None, None]
    y = layer_norm(jnp.arange(24.0).reshape(4, 3, 2), mask=padded, reduction_axes=(1, 2))
    assert bool(jnp.all(y[2] == 0))  # an example with no valid value: 0, the bias, not NaN
    gradient = jax.grad(lambda v: layer_norm(v, mask=padded, reduction_axes=(1, 2)).sum())(
        jnp.arange(24.0).reshape(4, 3, 2)
    )
    assert bool(jnp.all(jnp.isfinite(gradient)))
