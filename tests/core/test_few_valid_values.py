"""Channels with fewer than two valid values leave their running statistics as they were.

The batch variance of one value is 0: not an estimate of anything. Folding it in shrinks the
running variance towards 0, and evaluation then divides by sqrt(epsilon). Each test compares
the core with the rule written out in float64 NumPy: per channel, fold the batch's mean and
biased (or unbiased) variance in when at least two values were valid, else keep the old ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.core.reference import numpy_moments

MOMENTUM = 0.5


def _reference(old_mean, old_var, x, mask, *, unbiased=False, momentum=MOMENTUM):
    """The running (mean, var) after one batch, in float64, by the rule above."""
    with np.errstate(invalid="ignore", divide="ignore"):  # channels with < 2 values
        mean, biased, unbiased_var = numpy_moments(x, (0,), mask)
    batch_var = unbiased_var if unbiased else biased
    valid = np.broadcast_to(mask, x.shape).sum(axis=0) >= 2
    new_mean = np.where(valid, momentum * old_mean + (1 - momentum) * mean, old_mean)
    new_var = np.where(valid, momentum * old_var + (1 - momentum) * batch_var, old_var)
    return new_mean, new_var


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (6, 4))
    mask = np.ones((6, 4), bool)
    mask[1:, 0] = False  # channel 0: one valid value
    mask[:, 1] = False  # channel 1: none
    mask[2:, 2] = False  # channel 2: two valid values
    old_mean, old_var = np.array([1.0, -1.0, 0.5, 2.0]), np.array([4.0, 3.0, 2.0, 0.5])
    return x, mask, old_mean, old_var


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_a_channel_with_one_valid_value_keeps_its_running_statistics(unbiased):
    x, mask, old_mean, old_var = _data()
    state = bnjax.BatchNormState(
        jnp.asarray(old_mean, jnp.float32), jnp.asarray(old_var, jnp.float32), 0, 0
    )
    _, new = bnjax.batch_norm(
        jnp.asarray(x, jnp.float32),
        state,
        training=True,
        momentum=MOMENTUM,
        mask=mask,
        use_unbiased_running_var=unbiased,
    )
    expected_mean, expected_var = _reference(old_mean, old_var, x, mask, unbiased=unbiased)
    np.testing.assert_allclose(new.mean, expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, expected_var, rtol=1e-6)
    assert int(new.count) == 1 and int(new.skipped) == 0  # channels 2 and 3 were folded in


def test_evaluation_after_single_value_batches_stays_bounded():
    """Many training batches with one valid value per channel, then evaluation: the running
    variance stays at its start (1), so |y| stays at the scale of the data."""
    rng = np.random.default_rng(1)
    state = bnjax.batch_norm_state(3)
    mask = np.zeros((8, 1), bool)
    mask[0] = True
    step = jax.jit(
        lambda x, state: bnjax.batch_norm(x, state, training=True, momentum=0.9, mask=mask)[1]
    )
    for _ in range(50):
        state = step(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), state)
    np.testing.assert_array_equal(state.var, np.ones(3))
    np.testing.assert_array_equal(state.mean, np.zeros(3))
    assert int(state.count) == 0 and int(state.skipped) == 50  # no batch was an estimate
    y, _ = bnjax.batch_norm(jnp.asarray(rng.normal(size=(8, 3))), state, training=False)
    assert float(jnp.max(jnp.abs(y))) < 10.0


def test_ghost_batches_with_one_valid_value_are_left_out():
    """The update averages the ghost batches with >= 2 valid values of each channel."""
    x, _, old_mean, old_var = _data()
    mask = np.ones((6, 1), bool)
    mask[3:5] = False  # ghost batch 0: rows 0-2 (3 valid); ghost batch 1: rows 3-5 (1 valid)
    state = bnjax.BatchNormState(
        jnp.asarray(old_mean, jnp.float32), jnp.asarray(old_var, jnp.float32), 0, 0
    )
    _, new = bnjax.batch_norm(
        jnp.asarray(x, jnp.float32),
        state,
        training=True,
        momentum=MOMENTUM,
        mask=mask,
        ghost_batch_size=3,
    )
    full = np.ones((3, 1), bool)
    expected_mean, expected_var = _reference(old_mean, old_var, x[:3], full)
    np.testing.assert_allclose(new.mean, expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, expected_var, rtol=1e-6)


def test_renorm_channels_with_one_valid_value_keep_both_sets():
    x, mask, old_mean, old_var = _data()
    fresh = bnjax.batch_renorm_state(4)
    state = fresh._replace(
        mean=jnp.asarray(old_mean, jnp.float32),
        var=jnp.asarray(old_var, jnp.float32),
        renorm_mean=jnp.asarray(old_mean, jnp.float32),
        renorm_var=jnp.asarray(old_var, jnp.float32),
    )
    _, new = bnjax.batch_renorm(
        jnp.asarray(x, jnp.float32),
        state,
        training=True,
        momentum=MOMENTUM,
        renorm_momentum=MOMENTUM,
        r_max=2.0,
        d_max=1.0,
        mask=mask,
    )
    expected_mean, expected_var = _reference(old_mean, old_var, x, mask)
    for mean, var in ((new.mean, new.var), (new.renorm_mean, new.renorm_var)):
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, expected_var, rtol=1e-6)
    assert int(new.count) == 1 and int(new.step) == 1 and int(new.skipped) == 0


def test_an_all_masked_channel_no_longer_skips_the_other_channels():
    """One channel without valid values used to turn the whole update into NaN (skipped)."""
    x, mask, old_mean, old_var = _data()
    mask[:, 0] = mask[:, 1] = False
    state = bnjax.BatchNormState(
        jnp.asarray(old_mean, jnp.float32), jnp.asarray(old_var, jnp.float32), 0, 0
    )
    _, new = bnjax.batch_norm(
        jnp.asarray(x, jnp.float32), state, training=True, momentum=MOMENTUM, mask=mask
    )
    expected_mean, expected_var = _reference(old_mean, old_var, x, mask)
    np.testing.assert_allclose(new.mean, expected_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, expected_var, rtol=1e-6)
    assert int(new.count) == 1 and int(new.skipped) == 0
