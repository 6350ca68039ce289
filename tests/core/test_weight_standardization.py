"""Weight standardization and centralization against the paper's formula in float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from bnjax.core.weight_standardization import centralize_weight, standardize_weight


def _kernel(shape, seed=0, loc=0.0, scale=0.1):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _reference(w, epsilon=1e-5, axes=None, centered_only=False, keep=None):
    """WS, Qiao et al. (2019) Section 3.1, written out per output channel i over its I fan-in
    values j: mu_i = sum_j W_ij / I, sigma_i = sqrt(sum_j (W_ij - mu_i)^2 / I + epsilon),
    W_hat_ij = (W_ij - mu_i) / sigma_i (float64, one channel at a time)."""
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1)) if axes is None else axes
    other = tuple(a for a in range(w.ndim) if a not in axes)
    moved = np.moveaxis(w, other, tuple(range(len(other))))
    keep_moved = None if keep is None else np.moveaxis(keep, other, tuple(range(len(other))))
    out = np.zeros_like(moved)
    for index in np.ndindex(*moved.shape[: len(other)]):
        values = moved[index]
        kept = np.ones(values.shape, bool) if keep_moved is None else keep_moved[index]
        count = kept.sum()
        mu = values[kept].sum() / count
        deviation = values - mu
        if centered_only:
            out[index] = np.where(kept, deviation, 0.0)
            continue
        sigma = np.sqrt(np.sum(deviation[kept] ** 2) / count + epsilon)
        out[index] = np.where(kept, deviation / sigma, 0.0)
    return np.moveaxis(out, tuple(range(len(other))), other)


@pytest.mark.parametrize(
    "shape", [(3, 3, 4, 8), (5, 6), (3, 16, 2), (1, 1, 7, 3), (2, 2, 1, 5)]
)  # conv 2-D, dense, conv 1-D, 1x1 conv, one input channel
def test_standardize_matches_float64_reference(shape):
    w = _kernel(shape)
    got = standardize_weight(jnp.asarray(w))
    assert got.dtype == jnp.float32 and got.shape == shape
    np.testing.assert_allclose(got, _reference(w), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("epsilon", [1e-10, 1e-5, 1e-2])
def test_epsilon_inside_the_square_root(epsilon):
    w = _kernel((3, 3, 2, 4), scale=0.05)
    np.testing.assert_allclose(
        standardize_weight(w, epsilon=epsilon), _reference(w, epsilon), rtol=3e-6, atol=3e-6
    )


def test_centralize_matches_float64_reference():
    w = _kernel((3, 3, 4, 6), seed=3, loc=0.2)
    got = centralize_weight(w)
    np.testing.assert_allclose(got, _reference(w, centered_only=True), rtol=1e-6, atol=1e-7)
    # Centralization keeps the scale: only the per-channel mean goes.
    np.testing.assert_allclose(got.std(axis=(0, 1, 2)), w.std(axis=(0, 1, 2)), rtol=1e-5)


def test_fan_in_axes_select_the_statistics():
    w = _kernel((4, 3, 5), seed=2)
    for axes in [(0,), (0, 1), (1,)]:
        np.testing.assert_allclose(
            standardize_weight(w, fan_in_axes=axes), _reference(w, axes=axes), atol=3e-6
        )
    np.testing.assert_allclose(
        centralize_weight(w, fan_in_axes=(0,)),
        _reference(w, axes=(0,), centered_only=True),
        atol=1e-6,
    )


def test_mask_limits_the_statistics_and_zeroes_hidden_entries():
    w = _kernel((3, 3, 2, 4), seed=5, loc=1.0)
    keep = np.random.default_rng(6).random(w.shape) > 0.3
    got = standardize_weight(w, mask=keep)
    np.testing.assert_allclose(got, _reference(w, keep=keep), atol=3e-6)
    assert np.all(np.asarray(got)[~keep] == 0)
    np.testing.assert_allclose(
        centralize_weight(w, mask=keep), _reference(w, keep=keep, centered_only=True), atol=1e-6
    )


def test_stable_when_the_mean_dwarfs_the_spread():
    # mean / std = 1000: E[W^2] - E[W]^2 in float32 would keep about one digit.
    w = _kernel((3, 3, 8, 4), seed=7, loc=100.0, scale=0.1)
    np.testing.assert_allclose(standardize_weight(w), _reference(w), atol=2e-3)


def test_bfloat16_kernel_is_standardized_in_float32():
    w = _kernel((3, 3, 16, 8), seed=8, loc=4.0, scale=0.02)  # |mean| / std = 200
    w_bf16 = jnp.asarray(w, jnp.bfloat16)
    got = standardize_weight(w_bf16)
    assert got.dtype == jnp.bfloat16
    # The reference of the bf16 values themselves: one rounding to bf16 at the end.
    expected = _reference(np.asarray(w_bf16.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2, rtol=1e-2)
    # A bf16 computation loses it: the spread is below bf16's resolution of the mean.
    naive = (w_bf16 - w_bf16.mean((0, 1, 2))) / jnp.sqrt(w_bf16.var((0, 1, 2)) + 1e-5)
    assert np.abs(np.asarray(naive, np.float32) - expected).max() > 0.1


@pytest.mark.parametrize("function", [standardize_weight, centralize_weight])
def test_gradients_float64(function):
    with jax.enable_x64(True):
        w = jnp.asarray(_kernel((3, 2, 3, 4), seed=9), jnp.float64)
        check_grads(function, (w,), order=2, modes=("fwd", "rev"))
        assert function(w).dtype == jnp.float64


def test_gradient_against_autodiff_of_the_reference_formula():
    with jax.enable_x64(True):
        w = jnp.asarray(_kernel((3, 3, 2, 5), seed=10), jnp.float64)
        target = jnp.asarray(np.random.default_rng(11).normal(size=w.shape))

        def plain(w):
            mu = w.mean(axis=(0, 1, 2))
            sigma = jnp.sqrt(((w - mu) ** 2).mean(axis=(0, 1, 2)) + 1e-5)
            return jnp.sum(((w - mu) / sigma) * target)

        got = jax.grad(lambda w: jnp.sum(standardize_weight(w) * target))(w)
        np.testing.assert_allclose(got, jax.grad(plain)(w), rtol=1e-10, atol=1e-12)


def test_works_under_jit_and_vmap():
    w = jnp.asarray(_kernel((4, 3, 3, 2, 5), seed=12))  # a stack of 4 conv kernels
    stacked = jax.jit(jax.vmap(standardize_weight))(w)
    for i in range(4):
        np.testing.assert_allclose(stacked[i], _reference(np.asarray(w[i])), atol=3e-6)


def test_exported_from_the_package():
    assert bnjax.standardize_weight is standardize_weight
    assert bnjax.centralize_weight is centralize_weight


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: standardize_weight(jnp.ones((3, 3), jnp.int32)), TypeError, "`kernel`"),
        (lambda: centralize_weight(jnp.ones((4,))), ValueError, "rank >= 2"),
        (lambda: standardize_weight(jnp.ones((1, 1, 1, 4))), ValueError, "fan-in of 1"),
        (lambda: standardize_weight(jnp.ones((3, 1)), fan_in_axes=(1,)), ValueError, "fan-in"),
        (lambda: standardize_weight(jnp.ones((3, 4)), epsilon=0.0), ValueError, "`epsilon`"),
        (lambda: standardize_weight(jnp.ones((3, 4)), fan_in_axes=2), ValueError, "fan_in_axes"),
        (lambda: standardize_weight(jnp.ones((3, 4)), mask=jnp.ones((3, 4))), TypeError, "mask"),
        (
            lambda: centralize_weight(jnp.ones((3, 4)), mask=jnp.ones((4,), bool)),
            ValueError,
            "`mask`",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, words):
    with pytest.raises(error, match=words):
        call()
