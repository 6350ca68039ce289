"""The guard for incoming running statistics that are not finite (or a negative variance).

A NaN or inf running statistic never recovers (an average with NaN stays NaN) and is no fault
of the batch, so a training call must neither fold the batch in nor count it as skipped. When
the statistics are known at trace time (`checks.known_values`: eager calls, a state closed
over under a transform) a ValueError names the field before anything runs. When they are
traced, `guard_statistics` returns the flag that guards the update (`StateGuard.finite`) and
wires a run-time warning that reaches the host only when a flag is set.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.core.checks import known_values

Array = jax.Array


def _factory(function: str) -> str:
    factories = {"batch_renorm": "batch_renorm_state", "evonorm_b0": "evonorm_b0_state"}
    return factories.get(function, "batch_norm_state")


def _poisoned_message(function: str, names) -> str:
    return (
        f"{function}: the incoming running statistics {', '.join(names)} are not finite (NaN "
        f"or inf), so no batch can update them (an average with NaN or inf stays non-finite) "
        f"and evaluation with them gives NaN. This is the state's fault, not the batch's: reset "
        f"the statistics with bnjax.lifecycle.reset_statistics (or a fresh "
        f"bnjax.{_factory(function)}), or recalibrate them with bnjax.lifecycle.recalibrate."
    )


def _negative_message(function: str, field: str, values: np.ndarray) -> str:
    negative = np.flatnonzero(values < 0)
    shown = ", ".join(str(i) for i in negative[:8]) + (", ..." if negative.size > 8 else "")
    return (
        f"{function}: `state.{field}` is negative at flat feature index {shown} (min "
        f"{np.nanmin(values):.3g}); a variance is >= 0, and normalizing with a negative one "
        f"gives NaN. The state is corrupt (e.g. an edited or mismatched checkpoint): "
        f"bnjax.lifecycle.validate_statistics lists such layers; recalibrate them with "
        f"bnjax.lifecycle.recalibrate, or reset them with bnjax.lifecycle.reset_statistics "
        f"(or a fresh bnjax.{_factory(function)})."
    )


def check_known_statistics(
    state, fields, function: str, *, finite: bool = True, variances=("var",)
) -> bool:
    """Raises a ValueError naming the first bad field of `state` when the values of `fields`
    are known (eager calls, or a state closed over under jit, vmap, pmap or shard_map): a
    non-finite value (when `finite`), or a negative value in one of `variances`. One
    device-to-host read of the statistics; nothing at all when they are traced.

    Returns True when the values were checked, False when they are traced.
    """
    values = known_values(*(getattr(state, field) for field in fields))
    if values is None:
        return False
    if finite:
        flags = [bool(np.all(np.isfinite(value))) for value in values]
        if not all(flags):
            names = [f"`state.{f}`" for f, ok in zip(fields, flags, strict=True) if not ok]
            raise ValueError(_poisoned_message(function, names))
    for field, value in zip(fields, values, strict=True):
        if field in variances and np.any(value < 0):  # NaN compares False: not negative
            raise ValueError(_negative_message(function, field, value))
    return True


def not_finite_flags(state, fields) -> Array:
    """bool[len(fields)]: True where that statistic of `state` holds a NaN or inf (one small
    reduction over the stacked statistics, which all have the feature shape)."""
    stacked = jnp.stack([getattr(state, field) for field in fields])
    return ~jnp.all(jnp.isfinite(stacked), axis=tuple(range(1, stacked.ndim)))


@functools.cache
def _alert(function: str, fields: tuple[str, ...]):
    """The run-time alert for a traced state: `alert(flags)` returns an int32 zero and, only
    when a flag is set, warns from the host (a RuntimeWarning naming the fields).

    Why it is built this way (each choice measured with jax 0.10):
    - `pure_callback`, not `debug.callback`: any effect in a jitted program (even one that is
      never reached) takes every call of it off JAX's fast dispatch path (+40 us per call on
      CPU, more with many arguments). A pure callback has no effect, so its zero result must be
      used (the caller adds it to `skipped`) or it is dead code.
    - inside `lax.cond`: the host is only reached when a flag is set.
    - CPU and TPU only: on GPU a conditional reads its predicate back to the host, which would
      stall every step; there the frozen `count` and `skipped` are the signal.
    - `custom_vmap`: under vmap the flags of the batch are OR-ed first; a batched predicate
      would turn the conditional into a callback on every step.
    - a warning, not an exception: an exception from a callback surfaces as an opaque runtime
      error, and would stop one device while the others wait in a collective.
    """

    def warn(flags):
        names = [f"`state.{f}`" for f, bad in zip(fields, np.asarray(flags), strict=True) if bad]
        warnings.warn(
            _poisoned_message(function, names)
            + " The state was left unchanged and this batch was neither counted nor skipped.",
            RuntimeWarning,
            stacklevel=1,
        )
        return np.zeros((), np.int32)

    def call_if_set(flags):
        zero = jax.ShapeDtypeStruct((), jnp.int32)
        return lax.cond(
            jnp.any(flags),
            lambda: jax.pure_callback(warn, zero, flags),
            lambda: jnp.zeros((), jnp.int32),
        )

    @jax.custom_batching.custom_vmap
    def alert(flags):
        return lax.platform_dependent(
            flags, cpu=call_if_set, tpu=call_if_set, default=lambda _: jnp.zeros((), jnp.int32)
        )

    @alert.def_vmap
    def alert_batched(axis_size, in_batched, flags):
        del axis_size
        return alert(jnp.any(flags, axis=0) if in_batched[0] else flags), False

    return alert


class StateGuard(NamedTuple):
    """What a training call knows about its incoming statistics (see `guard_statistics`)."""

    finite: Array | bool  # the statistics are finite (False: update nothing, count nothing)
    alert: Array | int  # an int32 zero to add to `skipped` (keeps the run-time alert alive)


def guard_statistics(state, fields: tuple[str, ...], function: str) -> StateGuard:
    """Checks the incoming statistics `fields` of `state`: raises a ValueError when their
    values are known and not finite, or a variance is negative; when traced, returns the flag
    that guards the update and wires up the run-time warning (for non-finite values; a traced
    negative variance is not detected). Costs nothing at run time for a known state."""
    variances = tuple(field for field in fields if field.endswith("var"))
    if check_known_statistics(state, fields, function, variances=variances):
        return StateGuard(True, 0)
    flags = lax.stop_gradient(not_finite_flags(state, fields))
    return StateGuard(~jnp.any(flags), _alert(function, tuple(fields))(flags))
