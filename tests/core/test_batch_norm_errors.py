"""Every bad input to batch_norm fails at trace time with an error naming the argument."""

import jax
import jax.numpy as jnp
import pytest

import bnjax

X = jnp.ones((8, 4, 4, 3))
STATE = bnjax.batch_norm_state(3)


def _call(x=X, state=STATE, **kwargs):
    kwargs.setdefault("training", True)
    return bnjax.batch_norm(x, state, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(state=bnjax.batch_norm_state(4)), ValueError, r"`state.mean` has shape \(4,\)"),
        (dict(state=(jnp.zeros(3), jnp.ones(3))), TypeError, "`state` must be a BatchNormState"),
        (dict(x=jnp.ones((8, 3), jnp.int32)), TypeError, "`x` must have a floating-point"),
        (dict(axis=4), ValueError, r"`axis`=4 is out of range"),
        (dict(axis=(-1, 3)), ValueError, "`axis`.*same axis twice"),
        (dict(scale=jnp.ones(4)), ValueError, r"`scale` has shape \(4,\)"),
        (dict(bias=jnp.ones((1, 3))), ValueError, r"`bias` has shape \(1, 3\)"),
        (dict(ghost_batch_size=3), ValueError, "`ghost_batch_size`=3 does not divide"),
        (dict(ghost_batch_size=0), ValueError, "`ghost_batch_size` must be a positive int"),
        (dict(x=jnp.ones((1, 3))), ValueError, "single value"),
        (dict(x=jnp.ones((4, 1, 1, 3)), ghost_batch_size=1), ValueError, "single value"),
        (dict(x=jnp.ones(3)), ValueError, "`x` must have a batch axis"),
        (dict(momentum=1.5), ValueError, "`momentum`.*PyTorch"),
        (dict(epsilon=-1.0), ValueError, "`epsilon` must be >= 0"),
        (dict(mask=jnp.ones(5, bool)), ValueError, r"`mask` of shape \(5,\) does not broadcast"),
        (
            dict(mask=jnp.ones(8, bool)),
            ValueError,
            r"per-example mask .* mask.reshape\(8, 1, 1, 1\)",
        ),
        (dict(mask=jnp.ones((8, 4), bool)), ValueError, "`mask` of shape"),
        (dict(mask=jnp.ones((8, 2, 1, 1), bool)), ValueError, "`mask` of shape"),
        (dict(axis_index_groups=[[0, 1]]), ValueError, "`axis_index_groups` needs `axis_name`"),
        (dict(axis_name="batch"), ValueError, "`axis_name`='batch' is not bound"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kwargs)


def test_batch_of_one_is_fine_in_evaluation_mode():
    y, _ = _call(x=jnp.ones((1, 3)), training=False)
    assert y.shape == (1, 3)


def test_errors_fire_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="does not divide"):
        jax.jit(lambda x: _call(x=x, ghost_batch_size=3))(X)


def test_one_example_per_device_is_allowed_when_statistics_are_synced():
    def per_device(x):
        return bnjax.batch_norm(x, STATE, training=True, axis_name="batch")[0]

    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 1, 3)
    y = jax.pmap(per_device, axis_name="batch")(x)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_ghost_batch_size_is_ignored_in_evaluation_mode():
    # A model configured for ghost batches of 4 must still evaluate batches of any size.
    y, _ = _call(x=jnp.ones((3, 3)), training=False, ghost_batch_size=4)
    assert y.shape == (3, 3)
