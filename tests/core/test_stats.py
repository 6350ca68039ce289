"""Tests for bnjax.core.stats: moments, exact merging, cross-device merging."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.core import stats
from bnjax.core.stats import Moments

NUM_DEVICES = 8


def _normal(shape, seed=0, loc=0.0, scale=1.0, dtype=np.float32):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _numpy_moments(x, axes, mask=None):
    """float64 (count, mean, m2) with the reduced axes kept; mean = m2 = 0 where count = 0."""
    x = np.asarray(x, np.float64)
    mask = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    clean = np.where(mask, x, 0.0)
    count = mask.sum(axis=axes, keepdims=True).astype(np.float64)
    mean = clean.sum(axis=axes, keepdims=True) / np.maximum(count, 1)
    m2 = np.where(mask, np.square(clean - mean), 0.0).sum(axis=axes, keepdims=True)
    return Moments(count, mean, m2)


def _assert_moments_close(actual: Moments, expected: Moments, rtol, atol):
    chex.assert_trees_all_close(
        Moments(*(np.asarray(a, np.float64) for a in actual)),
        Moments(*(np.asarray(e, np.float64) for e in expected)),
        rtol=rtol,
        atol=atol,
    )


# --------------------------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------------------------

SHAPE = (4, 3, 5, 2)


def _mask(kind):
    rng = np.random.default_rng(1)
    if kind == "none":
        return None
    if kind == "per_example":
        # One mask entry per example, broadcast over the other axes.
        return np.array([True, False, True, True]).reshape(4, 1, 1, 1)
    mask = rng.random(SHAPE) < 0.7
    mask[0, :, 0, :] = True  # some group keeps every value
    mask[1, 1, :, :] = False  # and, for reduction_axes=(2, 3), one group keeps none
    return mask


@pytest.mark.parametrize("mask_kind", ["none", "per_example", "elementwise"])
@pytest.mark.parametrize("axes", [(0,), (0, 1, 2), (2, 3)])
def test_moments_match_numpy_float64(axes, mask_kind):
    x = _normal(SHAPE, seed=2, loc=3.0, scale=2.0)
    mask = _mask(mask_kind)
    expected = _numpy_moments(x, axes, mask)

    if mask is not None:
        # Masked-out entries are garbage, and must not leak into the result.
        poisoned = x.copy()
        garbage = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
        hidden = ~np.broadcast_to(mask, SHAPE)
        poisoned[hidden] = np.resize(garbage, hidden.sum())
        x = poisoned

    actual = stats.moments(jnp.asarray(x), axes, None if mask is None else jnp.asarray(mask))
    expected_shape = tuple(1 if a in axes else n for a, n in enumerate(SHAPE))
    for field in actual:
        assert field.shape == expected_shape
        assert field.dtype == jnp.float32
    _assert_moments_close(actual, expected, rtol=1e-5, atol=1e-5)

    with jax.enable_x64(True):
        actual64 = stats.moments(
            jnp.asarray(x, jnp.float64), axes, None if mask is None else jnp.asarray(mask)
        )
        assert actual64.mean.dtype == jnp.float64
        _assert_moments_close(actual64, expected, rtol=1e-12, atol=1e-12)


def test_moments_fully_masked_group_is_zero():
    x = jnp.asarray(_normal((3, 2), seed=3))
    mask = jnp.array([[True, False], [True, False], [False, False]])
    result = stats.moments(x, (0,), mask)
    chex.assert_trees_all_equal(result.count, jnp.array([[2.0, 0.0]]))
    assert float(result.mean[0, 1]) == 0.0
    assert float(result.m2[0, 1]) == 0.0


def test_moments_gradient_ignores_masked_garbage():
    """Masked-out NaN/inf must not poison gradients either (selected away before any
    arithmetic, as the docstring promises for values): the gradient equals the one computed
    with clean values in the masked slots."""
    clean = _normal((5, 2), seed=16, loc=1.0, scale=2.0)
    mask = jnp.array([True, True, False, True, False])[:, None]
    poisoned = clean.copy()
    poisoned[2] = np.nan
    poisoned[4] = np.inf

    def loss(x):
        result = stats.moments(x, (0,), mask)
        return jnp.sum(result.mean) + jnp.sum(result.m2)

    expected = jax.grad(loss)(jnp.asarray(clean))
    assert np.all(np.asarray(expected)[[2, 4]] == 0.0)
    chex.assert_trees_all_close(jax.grad(loss)(jnp.asarray(poisoned)), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_moments_of_half_precision_are_float32(dtype):
    x = jnp.asarray(_normal((64, 3), seed=4, loc=400.0, scale=30.0), dtype)
    result = stats.moments(x, (0,))
    assert result.mean.dtype == jnp.float32
    expected = _numpy_moments(np.asarray(x.astype(jnp.float32)), (0,))
    _assert_moments_close(result, expected, rtol=1e-5, atol=1e-2)


def test_moments_stable_when_mean_is_1000_times_std():
    x = _normal((4096, 2), seed=5, loc=1000.0, scale=1.0)
    expected = _numpy_moments(x, (0,))
    result = stats.moments(jnp.asarray(x), (0,))
    # Within float32 rounding of the float64 moments of the same float32 values.
    np.testing.assert_allclose(result.variance(), expected.m2 / expected.count, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------

CHUNK_SIZES = (5, 0, 11, 1, 6)  # uneven, with an empty chunk


def _chunk_moments_via_masks(x, sizes):
    """Moments of consecutive chunks of x (axis 0), as padded masked rows; stacked on axis 0."""
    width = max(sizes)
    rows, masks, start = [], [], 0
    for size in sizes:
        chunk = x[start : start + size]
        start += size
        pad = np.full((width - size, *x.shape[1:]), np.nan, x.dtype)
        rows.append(np.concatenate([chunk, pad]))
        masks.append(np.arange(width) < size)
    padded = jnp.asarray(np.stack(rows))  # (chunks, width, C)
    mask = jnp.asarray(np.stack(masks))[:, :, None]
    per_chunk = stats.moments(padded, (1,), mask)  # fields (chunks, 1, C)
    return per_chunk


def test_combine_uneven_chunks_exact_in_float64():
    with jax.enable_x64(True):
        x = _normal((sum(CHUNK_SIZES), 3), seed=6, loc=-2.0, scale=5.0, dtype=np.float64)
        per_chunk = _chunk_moments_via_masks(x, CHUNK_SIZES)
        assert float(per_chunk.count[1, 0, 0]) == 0.0
        combined = stats.combine(per_chunk, axis=0)
        whole = stats.moments(jnp.asarray(x), (0,))
        assert combined.mean.dtype == jnp.float64
        chex.assert_trees_all_equal_shapes(combined, whole)
        chex.assert_trees_all_equal(combined.count, whole.count)
        _assert_moments_close(combined, whole, rtol=1e-13, atol=1e-13)
        _assert_moments_close(combined, _numpy_moments(x, (0,)), rtol=1e-13, atol=1e-13)


def test_combine_uneven_chunks_float32_rounding():
    x = _normal((sum(CHUNK_SIZES), 3), seed=7, loc=100.0, scale=2.0)
    combined = stats.combine(_chunk_moments_via_masks(x, CHUNK_SIZES), axis=0)
    assert combined.mean.dtype == jnp.float32
    _assert_moments_close(combined, _numpy_moments(x, (0,)), rtol=1e-5, atol=1e-4)


def test_combine_along_a_later_axis():
    x = _normal((sum(CHUNK_SIZES), 3), seed=8, loc=1.0, scale=3.0)
    per_chunk = _chunk_moments_via_masks(x, CHUNK_SIZES)  # (chunks, 1, C)
    moved = Moments(*(jnp.moveaxis(f, 0, -1) for f in per_chunk))  # (1, C, chunks)
    combined = stats.combine(moved, axis=-1)
    _assert_moments_close(combined, _numpy_moments(x, (0,)), rtol=1e-5, atol=1e-4)


def test_combine_with_explicit_empty_summary():
    x = _normal((6, 2), seed=9)
    empty = Moments(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)))
    full = stats.moments(jnp.asarray(x), (0,))
    stacked = Moments(*(jnp.stack(pair) for pair in zip(empty, full, strict=True)))
    _assert_moments_close(stats.combine(stacked), full, rtol=1e-6, atol=1e-6)


def test_moments_of_empty_chunk_is_neutral_for_combine():
    """An empty (unmasked) chunk, e.g. a ragged last batch of size 0, must summarise as
    count = mean = m2 = 0 (the documented Moments convention), so that combining it changes
    nothing."""
    x = _normal((7, 2), seed=10)
    empty = stats.moments(jnp.zeros((0, 2)), (0,))
    full = stats.moments(jnp.asarray(x), (0,))
    chex.assert_trees_all_equal(empty.count, jnp.zeros((1, 2)))
    stacked = Moments(*(jnp.stack(pair) for pair in zip(full, empty, strict=True)))
    combined = stats.combine(stacked)
    assert np.isfinite(np.asarray(combined.mean)).all(), combined
    _assert_moments_close(combined, full, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(empty.mean, jnp.zeros((1, 2)))
    chex.assert_trees_all_equal(empty.m2, jnp.zeros((1, 2)))


# --------------------------------------------------------------------------------------------
# merge_across_devices
# --------------------------------------------------------------------------------------------

PER_DEVICE = 6
VALID_PER_DEVICE = (6, 1, 0, 3, 5, 2, 6, 4)  # ragged, one device with no valid value


def _ragged_device_data(seed):
    x = _normal((NUM_DEVICES, PER_DEVICE, 3), seed=seed, loc=50.0, scale=4.0)
    mask = np.arange(PER_DEVICE)[None, :] < np.array(VALID_PER_DEVICE)[:, None]
    valid = x[mask]  # the concatenated valid values, (sum(VALID_PER_DEVICE), 3)
    x = np.where(mask[..., None], x, np.nan).astype(np.float32)  # garbage where invalid
    return x, mask, valid


def _local_then_merge(x, mask, axis_name="batch", axis_index_groups=None):
    stats.check_axis_name_bound(axis_name)
    local = stats.moments(x, (0,), mask[:, None])
    return stats.merge_across_devices(local, axis_name, axis_index_groups)


def test_eight_devices_available():
    assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py should force 8 CPU devices"


def test_merge_across_devices_pmap_ragged_masks():
    x, mask, valid = _ragged_device_data(seed=11)
    merged = jax.pmap(_local_then_merge, axis_name="batch")(jnp.asarray(x), jnp.asarray(mask))
    expected = _numpy_moments(valid, (0,))  # (1, 3)
    for device in range(NUM_DEVICES):
        _assert_moments_close(Moments(*(f[device] for f in merged)), expected, rtol=1e-5, atol=1e-3)


def test_merge_across_devices_pmap_axis_index_groups():
    x, mask, _ = _ragged_device_data(seed=12)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    merged = jax.pmap(
        lambda x, m: _local_then_merge(x, m, axis_index_groups=groups), axis_name="batch"
    )(jnp.asarray(x), jnp.asarray(mask))
    for group in groups:
        valid = np.concatenate([x[d][mask[d]] for d in group])
        expected = _numpy_moments(valid, (0,))
        for device in group:
            _assert_moments_close(
                Moments(*(f[device] for f in merged)), expected, rtol=1e-5, atol=1e-3
            )


def test_merge_across_devices_shard_map_ragged_masks():
    x, mask, valid = _ragged_device_data(seed=13)
    mesh = jax.make_mesh((NUM_DEVICES,), ("batch",))
    sharding = jax.NamedSharding(mesh, jax.P("batch"))
    global_x = jax.device_put(jnp.asarray(x.reshape(-1, 3)), sharding)  # (48, 3)
    global_mask = jax.device_put(jnp.asarray(mask.reshape(-1)), sharding)  # (48,)
    merge = jax.shard_map(
        _local_then_merge,
        mesh=mesh,
        in_specs=(jax.P("batch"), jax.P("batch")),
        out_specs=jax.P(),  # the merged moments are replicated
    )
    merged = jax.jit(merge)(global_x, global_mask)
    for field in merged:
        assert field.shape == (1, 3)
    _assert_moments_close(merged, _numpy_moments(valid, (0,)), rtol=1e-5, atol=1e-3)


def test_merge_across_devices_exact_in_float64():
    with jax.enable_x64(True):
        x, mask, valid = _ragged_device_data(seed=14)
        merged = jax.pmap(_local_then_merge, axis_name="batch")(
            jnp.asarray(x, jnp.float64), jnp.asarray(mask)
        )
        assert merged.mean.dtype == jnp.float64
        expected = _numpy_moments(valid.astype(np.float32), (0,))
        _assert_moments_close(Moments(*(f[0] for f in merged)), expected, rtol=1e-12, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Moments.variance and check_axis_name_bound
# --------------------------------------------------------------------------------------------


def test_variance_biased_and_unbiased():
    x = _normal((9, 2), seed=15, loc=2.0, scale=3.0)
    result = stats.moments(jnp.asarray(x), (0,))
    np.testing.assert_allclose(result.variance(), x.var(axis=0, ddof=0)[None], rtol=1e-5)
    np.testing.assert_allclose(
        result.variance(unbiased=False), x.var(axis=0, ddof=0)[None], rtol=1e-5
    )
    np.testing.assert_allclose(
        result.variance(unbiased=True), x.var(axis=0, ddof=1)[None], rtol=1e-5
    )
    explicit = Moments(jnp.array(4.0), jnp.array(1.0), jnp.array(6.0))
    assert float(explicit.variance()) == 1.5
    assert float(explicit.variance(unbiased=True)) == 2.0


def test_check_axis_name_bound_outside_pmap_names_axis_name():
    with pytest.raises(ValueError, match="`axis_name`='batch' is not bound"):
        stats.check_axis_name_bound("batch")


def test_check_axis_name_bound_inside_pmap_passes():
    out = jax.pmap(lambda v: (stats.check_axis_name_bound("batch"), v)[1], axis_name="batch")(
        jnp.arange(NUM_DEVICES, dtype=jnp.float32)
    )
    chex.assert_trees_all_equal(out, jnp.arange(NUM_DEVICES, dtype=jnp.float32))
