"""The guard for incoming running statistics that are not finite (or a negative variance).

A NaN or inf running statistic never recovers (an average with NaN stays NaN) and is no fault
of the batch, so a training call must neither fold the batch in nor count it as skipped. When
the statistics are known at trace time (`checks.known_values`: eager calls, a state closed
over under a transform) a ValueError names the field before anything runs. When they are
traced, `guard_statistics` returns the flag that guards the update (`StateGuard.finite`) and
wires a run-time warning that reaches the host only when the flag is set;
`deferred_guard_statistics` leaves that flag to the update, which computes it in the same
reduction as its own flags (`all_of`: on XLA:CPU one kernel for every flag of a batch norm
update, where a reduction per flag would cost three small kernels each).
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


def all_of(*masks) -> tuple[Array, ...]:
    """One bool per boolean mask: all its values are True (True for an empty mask).

    Masks of one shape (the statistics of one layer all have the feature shape) are reduced
    by one variadic reduction, which XLA:CPU compiles to a single kernel with the masks'
    producers fused in; a reduction of one small vector becomes three kernels there (its
    producer, a partial and a final reduction), so k separate ones would cost 3k.
    """
    if len(masks) < 2 or len({m.shape for m in masks}) > 1:
        return tuple(jnp.all(m) for m in masks)
    return tuple(
        lax.reduce(
            tuple(masks),
            (np.bool_(True),) * len(masks),
            lambda xs, ys: tuple(x & y for x, y in zip(xs, ys, strict=True)),
            tuple(range(masks[0].ndim)),
        )
    )


def finite_flags(*arrays) -> tuple[Array, ...]:
    """One bool per array: every value of that array is finite (`all_of` their masks)."""
    return all_of(*(jnp.isfinite(a) for a in arrays))


def all_true(flags) -> Array | bool:
    """The AND of scalar bools (True for none)."""
    return functools.reduce(jnp.logical_and, flags, True)


@functools.cache
def _alert(function: str, fields: tuple[str, ...]):
    """The run-time alert for a traced state: `alert(finite, *values)` (`finite`: a bool,
    the statistics `values` of `fields` are all finite) returns an int32 zero and, only when
    `finite` is False, warns from the host (a RuntimeWarning naming the fields of `values`
    that are not finite, found there from the values).

    Why it is built this way (each choice measured with jax 0.10):
    - `pure_callback`, not `debug.callback`: any effect in a jitted program (even one that is
      never reached) takes every call of it off JAX's fast dispatch path (+40 us per call on
      CPU, more with many arguments). A pure callback has no effect, so its zero result must be
      used (the caller adds it to `skipped`) or it is dead code.
    - inside `lax.cond`: the host is only reached when the flag is set.
    - one flag, the fields named on the host: per-field flags on the device would cost a
      reduction (three small kernels on XLA:CPU) on every step, to serve a warning that is
      almost never given.
    - CPU and TPU only: on GPU a conditional reads its predicate back to the host, which would
      stall every step; there the frozen `count` and `skipped` are the signal.
    - `custom_vmap`: under vmap the flags of the batch are AND-ed first (the host then names
      the fields not finite in any member); a batched predicate would turn the conditional
      into a callback on every step.
    - a warning, not an exception: an exception from a callback surfaces as an opaque runtime
      error, and would stop one device while the others wait in a collective.
    """

    def warn(*values):
        names = [
            f"`state.{f}`"
            for f, value in zip(fields, values, strict=True)
            if not np.all(np.isfinite(np.asarray(value)))
        ]
        warnings.warn(
            _poisoned_message(function, names)
            + " The state was left unchanged and this batch was neither counted nor skipped.",
            RuntimeWarning,
            stacklevel=1,
        )
        return np.zeros((), np.int32)

    def call_if_set(finite, *values):
        zero = jax.ShapeDtypeStruct((), jnp.int32)
        return lax.cond(
            finite,
            lambda: jnp.zeros((), jnp.int32),
            lambda: jax.pure_callback(warn, zero, *values),
        )

    @jax.custom_batching.custom_vmap
    def alert(finite, *values):
        zero = lambda *_: jnp.zeros((), jnp.int32)  # noqa: E731
        return lax.platform_dependent(
            finite, *values, cpu=call_if_set, tpu=call_if_set, default=zero
        )

    @alert.def_vmap
    def alert_batched(axis_size, in_batched, finite, *values):
        del axis_size
        return alert(jnp.all(finite, axis=0) if in_batched[0] else finite, *values), False

    return alert


class StateGuard(NamedTuple):
    """What a training call knows about its incoming statistics (see `guard_statistics`)."""

    finite: Array | bool  # the statistics are finite (False: update nothing, count nothing)
    alert: Array | int  # an int32 zero to add to `skipped` (keeps the run-time alert alive)


def _traced_guard(state, finite: Array, fields: tuple[str, ...], function: str) -> StateGuard:
    """The guard of `state`'s traced `fields`, from `finite` (bool: all of them are finite)."""
    finite = lax.stop_gradient(finite)
    values = [lax.stop_gradient(getattr(state, f)) for f in fields]
    return StateGuard(finite, _alert(function, tuple(fields))(finite, *values))


def guard_statistics(state, fields: tuple[str, ...], function: str) -> StateGuard:
    """Checks the incoming statistics `fields` of `state`: raises a ValueError when their
    values are known and not finite, or a variance is negative; when traced, returns the flag
    that guards the update and wires up the run-time warning (for non-finite values; a traced
    negative variance is not detected). Costs nothing at run time for a known state."""
    variances = tuple(field for field in fields if field.endswith("var"))
    if check_known_statistics(state, fields, function, variances=variances):
        return StateGuard(True, 0)
    finite = all_true(finite_flags(*(getattr(state, f) for f in fields)))
    return _traced_guard(state, finite, fields, function)


class DeferredGuard(NamedTuple):
    """Traced incoming statistics whose finite check waits for the update's own, so that
    both come from one reduction (`all_of` over `masks` and the update's masks, then `guard`);
    from `deferred_guard_statistics`."""

    fields: tuple[str, ...]
    function: str

    def masks(self, state) -> list[Array]:
        """The `isfinite` masks of `state`'s `fields`, to reduce with the update's own."""
        return [jnp.isfinite(getattr(state, f)) for f in self.fields]

    def guard(self, state, flags) -> StateGuard:
        """The guard of `state`'s `fields` from `flags`, the `all_of` their `masks`."""
        return _traced_guard(state, all_true(flags), self.fields, self.function)


def deferred_guard_statistics(
    state, fields: tuple[str, ...], function: str
) -> StateGuard | DeferredGuard:
    """`guard_statistics`, with the traced check left to the update: raises the same
    ValueError now when the values are known (and returns the guard of a finite state);
    when they are traced, returns a `DeferredGuard` that checks them together with the updated
    statistics, in one reduction instead of two."""
    variances = tuple(field for field in fields if field.endswith("var"))
    if check_known_statistics(state, fields, function, variances=variances):
        return StateGuard(True, 0)
    return DeferredGuard(tuple(fields), function)
