"""The state of moving average batch norm: exponential averages and rings of past statistics.

`MovingAverageBatchNormState` holds, per channel, the exponential moving averages that
evaluation uses ('mean', 'var') and four rings of the previous window - 1 steps' batch
statistics: the forward pass's (mean_history, var_history) and the backward pass's
(grad_mean_history: g_B, grad_scaled_history: psi_B). A ring is written in step order at
slot ``writes % (window - 1)``; `past_sum` adds the filled slots. The forward statistics are
written by `bnjax.moving_average_batch_norm`, the backward ones by
`moving_average_batch_norm_backward_update` from the gradient of the probe
(`moving_average_batch_norm_probe`). See `bnjax.core.moving_average_batch_norm` for the math.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks
from bnjax.core.batch_norm import BatchNormState
from bnjax.core.running_update import all_finite

__all__ = [
    "MovingAverageBatchNormState",
    "moving_average_batch_norm_backward_update",
    "moving_average_batch_norm_probe",
    "moving_average_batch_norm_state",
]

Array = jax.Array


class MovingAverageBatchNormState(NamedTuple):
    """State of a moving-average batch-norm layer (a pytree; pass it in, get it back).

    Attributes:
      mean: (C,) exponential moving average of mu_bar, for evaluation (stays 0 unless
        centered).
      var: (C,) exponential moving average of sigma2_bar (centered) or of the second moment
        chi_bar (reduced form: the variance about mean 0), for evaluation and for r.
      mean_history: (window - 1, C) the previous steps' batch means mu_B (0 unless centered).
      var_history: (window - 1, C) the previous steps' sigma2_B (or chi_B).
      grad_mean_history: (window - 1, C) the previous steps' g_B (0 unless centered).
      grad_scaled_history: (window - 1, C) the previous steps' psi_B.
      count: int32, training batches folded in (drives the ring and the warm-up).
      backward_count: int32, backward statistics folded in.
      skipped: int32, training batches left out because their statistics were not finite.

    Example:
      >>> state = moving_average_batch_norm_state(3, window=4)
      >>> state.var_history.shape, state.var.tolist()
      ((3, 3), [1.0, 1.0, 1.0])
    """

    mean: Array
    var: Array
    mean_history: Array
    var_history: Array
    grad_mean_history: Array
    grad_scaled_history: Array
    count: Array
    backward_count: Array
    skipped: Array

    @property
    def window(self) -> int:
        """m: the number of steps the simple moving averages span (the history + 1)."""
        return self.mean_history.shape[0] + 1

    def as_batch_norm_state(self) -> BatchNormState:
        """The evaluation statistics as a BatchNormState (for folding, recalibration, ...)."""
        return BatchNormState(self.mean, self.var, self.count, self.skipped)


def moving_average_batch_norm_state(
    num_features: int | Sequence[int], *, window: int = 16, dtype=None
) -> MovingAverageBatchNormState:
    """A fresh state: mean 0, var 1, empty histories for moving averages over `window` steps.

    Args:
      num_features: channels C, or the feature shape.
      window: m, the steps each simple moving average spans (>= 1; 1 uses the current batch).
      dtype: statistics dtype; float32 by default (float64 under x64).

    Example:
      >>> state = moving_average_batch_norm_state(8, window=4)
      >>> state.grad_scaled_history.shape, state.window, int(state.backward_count)
      ((3, 8), 4, 0)
    """
    if isinstance(num_features, (list, tuple)):
        shape = tuple(checks.as_int(n, "num_features") for n in num_features)
    else:
        shape = (checks.as_int(num_features, "num_features"),)
    if any(n < 0 for n in shape):
        raise ValueError(f"`num_features` must be non-negative, got {num_features!r}.")
    window = checks.as_int(window, "window")
    if window < 1:
        raise ValueError(f"`window` (steps of the moving averages) must be >= 1, got {window}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if dtype not in checks.STATISTICS_DTYPES[:2]:
        raise TypeError(f"`dtype` of the statistics must be float32 or float64, got {dtype}.")

    # A new array per field: one buffer shared by several leaves cannot be donated.
    def history():
        return jnp.zeros((window - 1, *shape), dtype)

    def zero():
        return jnp.zeros((), jnp.int32)

    return MovingAverageBatchNormState(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        mean_history=history(),
        var_history=history(),
        grad_mean_history=history(),
        grad_scaled_history=history(),
        count=zero(),
        backward_count=zero(),
        skipped=zero(),
    )


def moving_average_batch_norm_probe(state: MovingAverageBatchNormState) -> Array:
    """The zero `probe` input for `state`: (2, *feature_shape), whose gradient is (g_B, psi_B).

    Example:
      >>> moving_average_batch_norm_probe(moving_average_batch_norm_state(5)).shape
      (2, 5)
    """
    return jnp.zeros((2, *state.var.shape), state.var.dtype)


_HISTORIES = ("mean_history", "var_history", "grad_mean_history", "grad_scaled_history")


def check_state(state, feature_shape, axis) -> MovingAverageBatchNormState:
    """Raises unless `state` is a MovingAverageBatchNormState for `feature_shape` (each
    error names the field and the fix); returns it with Python-int counters as int32."""
    if not isinstance(state, MovingAverageBatchNormState):
        raise TypeError(
            "`state` must be a MovingAverageBatchNormState (from "
            f"bnjax.moving_average_batch_norm_state), got {type(state).__name__}."
        )
    factory = "moving_average_batch_norm_state"
    checks.check_statistics(state, ("mean", "var"), feature_shape, axis, factory)
    for name in _HISTORIES:
        value = getattr(state, name)
        if tuple(jnp.shape(value)) != (state.window - 1, *feature_shape):
            raise ValueError(
                f"`state.{name}` has shape {tuple(jnp.shape(value))}, expected "
                f"{(state.window - 1, *feature_shape)} (window - 1 past steps of "
                f"{feature_shape} features); create it with bnjax.{factory}."
            )
    return checks.as_counters(state, ("count", "backward_count", "skipped"), factory)


def past_sum(history: Array, stored: Array) -> tuple[Array, Array]:
    """(sum of the filled slots of a ring `history`, their number) after `stored` writes."""
    slots = history.shape[0]
    filled = jnp.minimum(stored, slots)
    valid = jnp.arange(slots) < filled
    valid = valid.reshape((slots,) + (1,) * (history.ndim - 1))
    return jnp.sum(jnp.where(valid, history, 0), axis=0), filled.astype(history.dtype)


def written(history: Array, stored: Array, value: Array) -> Array:
    """`history` with `value` in the ring slot of write number `stored`."""
    if history.shape[0] == 0:
        return history
    return lax.dynamic_update_index_in_dim(
        history, value.astype(history.dtype), stored % history.shape[0], axis=0
    )


def moving_average_batch_norm_backward_update(
    state: MovingAverageBatchNormState, probe_grad: Array
) -> MovingAverageBatchNormState:
    """Folds one step's backward statistics (the gradient of `probe`) into the state.

    `probe_grad` is (2, *feature_shape): (g_B, psi_B) of the step. Call it once per training
    step, after the step's forward update. Non-finite statistics are left out (the state is
    returned unchanged).

    Example:
      >>> state = moving_average_batch_norm_state(2, window=3)
      >>> state = moving_average_batch_norm_backward_update(state, jnp.ones((2, 2)))
      >>> state.grad_scaled_history.tolist(), int(state.backward_count)
      ([[1.0, 1.0], [0.0, 0.0]], 1)
    """
    if not isinstance(state, MovingAverageBatchNormState):
        raise TypeError(
            f"`state` must be a MovingAverageBatchNormState, got {type(state).__name__}."
        )
    probe_grad = jnp.asarray(probe_grad)
    expected = (2, *jnp.shape(state.var))
    if tuple(probe_grad.shape) != expected:
        raise ValueError(
            f"`probe_grad` has shape {tuple(probe_grad.shape)}, expected {expected}: the "
            f"gradient of the probe from bnjax.moving_average_batch_norm_probe(state)."
        )
    state = checks.as_counters(
        state, ("count", "backward_count", "skipped"), "moving_average_batch_norm_state"
    )
    folded = all_finite(probe_grad)
    stored = state.backward_count
    return state._replace(
        grad_mean_history=jnp.where(
            folded, written(state.grad_mean_history, stored, probe_grad[0]),
            state.grad_mean_history,
        ),
        grad_scaled_history=jnp.where(
            folded, written(state.grad_scaled_history, stored, probe_grad[1]),
            state.grad_scaled_history,
        ),
        backward_count=stored + folded.astype(jnp.int32),
    )  # fmt: skip
