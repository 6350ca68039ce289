"""How one training batch updates running statistics: per feature, guarded, counted.

Shared by `batch_norm` (one set of statistics) and `batch_renorm` (two sets, updated together):

    batch_statistics_for_update   per-ghost-batch (mean, var, count) -> one (mean, var) per
                                  feature, and which features the batch estimated
    updated_statistics            running = momentum * running + (1 - momentum) * batch
                                  (or the cumulative average), kept where not estimated
    counters_after                the skip accounting: `count` += folded; `skipped` += not
                                  folded, unless the incoming state itself was not finite

A batch is folded in when its updated statistics are all finite and it estimated at least one
feature; otherwise the statistics stay as they were. The state is a NamedTuple whose fields
are replaced (`BatchNormState`, `BatchRenormState`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core.state_guard import DeferredGuard, StateGuard, all_of, all_true, finite_flags

if TYPE_CHECKING:
    from bnjax.core.batch_norm import BatchLayout, BatchNormState, TrainingPlan

Array = jax.Array


class BatchUpdate(NamedTuple):
    """One batch's contribution to the running statistics (feature shape)."""

    mean: Array
    var: Array  # biased, or unbiased when the state stores the unbiased variance
    estimated: Array  # bool: the feature had at least two valid values (in some ghost batch)

    @property
    def any_estimated(self) -> Array | bool:
        """The batch estimated some feature (a layer with no features counts every batch)."""
        return jnp.any(self.estimated) if self.estimated.size else True


MIN_VALUES_PER_ESTIMATE = 2
"""Fewest valid values whose variance updates a running variance: the variance of one value
is 0 whatever the data, and folding that in drives the running variance towards 0."""


def batch_statistics_for_update(
    mean: Array,
    var: Array,
    count: Array,
    layout: BatchLayout,
    plan: TrainingPlan,
    *,
    use_unbiased_running_var: bool,
) -> BatchUpdate:
    """One (mean, var) per feature from per-ghost-batch statistics, and which features they
    estimate.

    Ghost batches are averaged with equal weight, so the update equals the average of what each
    ghost batch would give on its own (local mode = independent devices). Ghost batches with
    fewer than two valid values of a feature (`MIN_VALUES_PER_ESTIMATE`) are left out for that
    feature; a feature no ghost batch estimates is marked in `estimated` and keeps its running
    statistics. With `axis_name`, the average runs over the ghost batches of every device so
    the replicated state stays identical (the counts are global without ghost batches).
    """
    usable = count >= MIN_VALUES_PER_ESTIMATE
    if use_unbiased_running_var:
        var = var * count / jnp.maximum(count - 1, 1)
    weight = usable.astype(var.dtype)
    sums = (
        jnp.sum(weight, axis=0),
        jnp.sum(jnp.where(usable, mean, 0), axis=0),
        jnp.sum(jnp.where(usable, var, 0), axis=0),
    )
    if plan.update_axis_name is not None:
        sums = lax.psum(
            sums, plan.update_axis_name, axis_index_groups=plan.update_axis_index_groups
        )
    total, mean_sum, var_sum = sums
    safe_total = jnp.maximum(total, 1)
    feature_shape = layout.feature_shape
    return BatchUpdate(
        (mean_sum / safe_total).reshape(feature_shape),
        (var_sum / safe_total).reshape(feature_shape),
        (total > 0).reshape(feature_shape),
    )


def averaged_statistics(mean, var, batch_mean, batch_var, count, momentum):
    """The running (mean, var) after folding in one batch's, in the dtypes of `mean`, `var`
    (a complex batch mean makes the running mean complex, as in flax)."""
    dtype = var.dtype
    if jnp.iscomplexobj(batch_mean):
        mean = mean.astype(jnp.promote_types(mean.dtype, batch_mean.dtype))
    batch_mean = batch_mean.astype(mean.dtype)
    batch_var = batch_var.astype(dtype)
    if momentum is None:
        weight = 1.0 / (count + 1).astype(dtype)
        return mean + weight * (batch_mean - mean), var + weight * (batch_var - var)
    return (
        momentum * mean + (1.0 - momentum) * batch_mean,
        momentum * var + (1.0 - momentum) * batch_var,
    )


def all_finite(*arrays) -> Array:
    """One boolean: every value of every array is finite (one reduction for arrays of one
    shape, `state_guard.finite_flags`)."""
    return all_true(finite_flags(*arrays))


def updated_statistics(
    mean: Array, var: Array, batch: BatchUpdate, count: Array, momentum: float | None
) -> tuple[Array, Array]:
    """The running (mean, var) with `batch` averaged in (`averaged_statistics`), except in the
    features the batch could not estimate (`batch.estimated` False: fewer than two valid
    values), which keep their running statistics."""
    new_mean, new_var = averaged_statistics(mean, var, batch.mean, batch.var, count, momentum)
    return jnp.where(batch.estimated, new_mean, mean), jnp.where(batch.estimated, new_var, var)


def counters_after(state, folded: Array, guard: StateGuard) -> dict[str, Array]:
    """The skip accounting of one training batch: `count` and `skipped` of `state` after it.

    ``count += folded`` (the batch entered the running statistics) and ``skipped += not
    folded``, except when the incoming statistics were already not finite (`guard.finite`
    False): that is the state's fault, not the batch's, so neither counter moves. The guard's
    `alert` (an int32 zero) is added to `skipped` to keep its run-time warning alive.
    """
    return dict(
        count=state.count + folded.astype(jnp.int32),
        skipped=state.skipped + (~folded & guard.finite).astype(jnp.int32) + guard.alert,
    )


def running_update(
    state: BatchNormState,
    batch: BatchUpdate,
    momentum: float | None,
    guard: StateGuard | DeferredGuard,
) -> BatchNormState:
    """Folds one batch's statistics into the state, per feature, unless they are not finite.

    Features the batch could not estimate keep their running statistics
    (`updated_statistics`). A batch whose estimated statistics are not finite, or that
    estimated no feature at all, is left out and counted in `skipped`. A state that is itself
    not finite (`guard.finite` False) cannot be updated: it is returned unchanged, with
    neither `count` nor `skipped` advanced (`counters_after`). A `DeferredGuard` (traced
    incoming statistics) is checked here, in the same reduction as the new statistics.
    """
    new_mean, new_var = updated_statistics(state.mean, state.var, batch, state.count, momentum)
    # One reduction for every flag of the update (a deferred guard's incoming statistics,
    # the new statistics, which features were estimated): see `state_guard.all_of`.
    incoming = guard.masks(state) if isinstance(guard, DeferredGuard) else []
    new = [jnp.isfinite(new_mean), jnp.isfinite(new_var)]
    none_estimated = (
        [~batch.estimated]
        if batch.estimated.size and batch.estimated.shape == new_mean.shape
        else []
    )
    flags = all_of(*incoming, *new, *none_estimated)
    if isinstance(guard, DeferredGuard):
        guard = guard.guard(state, flags[: len(incoming)])
    finite = all_true(flags[len(incoming) : len(incoming) + len(new)])
    any_estimated = ~flags[-1] if none_estimated else batch.any_estimated
    folded = finite & any_estimated
    return state._replace(
        mean=jnp.where(folded, new_mean, state.mean),
        var=jnp.where(folded, new_var, state.var),
        **counters_after(state, folded, guard),
    )
