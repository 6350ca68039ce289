"""One rule for "is this value known at trace time?" (`checks.known_values`), one zero-count
inverse (`stats.inverse_root`) and one skip accounting (`running_update.counters_after`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax.core import checks, running_update, state_guard, stats
from bnjax.lifecycle import evaluation_affine


def test_known_values_reads_python_numpy_and_concrete_arrays_together():
    values = checks.known_values(0.5, np.float32(2.0), jnp.arange(3.0), [[1.0, 2.0]])
    assert [np.asarray(v).tolist() for v in values] == [0.5, 2.0, [0.0, 1.0, 2.0], [[1.0, 2.0]]]
    assert all(isinstance(v, np.ndarray) for v in values)


def test_none_is_absent_not_unknown():
    assert checks.known_values(None, 1.0)[0] is None
    assert checks.known_values(None, 1.0)[1] == 1.0


@pytest.mark.parametrize("wrap", [lambda t: t, lambda t: [t, 1.0]], ids=["traced", "list"])
def test_a_traced_value_anywhere_makes_all_unknown(wrap):
    @jax.jit
    def read(t):
        assert checks.known_values(1.0, wrap(t)) is None
        assert not checks.is_known(wrap(t))
        return t

    read(1.0)


def test_every_value_reading_check_follows_the_rule():
    """Core checks and folding read the same values: concrete ones are checked, traced pass."""
    with pytest.raises(ValueError, match="`epsilon` must be"):
        bnjax.batch_norm(jnp.ones((4, 2)), bnjax.batch_norm_state(2), training=True, epsilon=0.0)
    with pytest.raises(ValueError, match="negative var"):
        evaluation_affine(jnp.zeros(2), jnp.array([1.0, -1.0]))

    @jax.jit
    def traced(epsilon, var):
        y, _ = bnjax.batch_norm(
            jnp.arange(8.0).reshape(4, 2), bnjax.batch_norm_state(2), training=True, epsilon=epsilon
        )
        return y, evaluation_affine(jnp.zeros(2), var)

    traced(0.0, jnp.array([1.0, -1.0]))  # nothing known at trace time: nothing raised


def test_none_epsilon_is_still_refused_by_name():
    with pytest.raises(TypeError, match="`epsilon` must be a real number, got None"):
        bnjax.layer_norm(jnp.ones((2, 3)), epsilon=None)


def test_inverse_root_is_zero_without_values_and_rsqrt_otherwise():
    inv = stats.inverse_root(jnp.array([0.0, 4.0]), jnp.array([0.0, 3.0]), 1.0)
    assert inv.tolist() == [0.0, 0.5]


@pytest.mark.parametrize(
    ("folded", "finite", "counts"),
    [(True, True, (3, 1)), (False, True, (2, 2)), (False, False, (2, 1))],
    ids=["folded", "skipped", "state-not-finite"],
)
def test_counters_after_counts_folded_and_skipped_batches(folded, finite, counts):
    state = bnjax.batch_norm_state(1)._replace(count=jnp.int32(2), skipped=jnp.int32(1))
    guard = state_guard.StateGuard(jnp.asarray(finite), jnp.zeros((), jnp.int32))
    new = running_update.counters_after(state, jnp.asarray(folded), guard)
    assert (int(new["count"]), int(new["skipped"])) == counts
