"""Batch normalization as a pure function with an explicit state pytree.

Training (statistics of the batch, per channel c, over every axis but the feature axes):

    mu_c, var_c = mean and biased variance of the valid x[..., c] in the batch
    y = scale * (x - mu) / sqrt(var + epsilon) + bias

Evaluation uses the running statistics of the state instead and returns the state unchanged.

Running statistics (the conventions of flax and Keras; PyTorch's momentum=0.1 is our 0.9):

    running = momentum * running + (1 - momentum) * batch        (momentum in [0, 1])
    running = running + (batch - running) / (count + 1)          (momentum=None: plain average
                                                                  of every batch seen, as
                                                                  PyTorch's momentum=None)

The stored variance is the biased batch variance (flax, Keras 3) unless
`use_unbiased_running_var=True`, which stores ``var * n / (n - 1)`` as PyTorch does. The
normalization itself always uses the biased variance, in every framework.

References:
  Ioffe & Szegedy (2015), Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift, ICML, arXiv:1502.03167.
  Hoffer, Hubara & Soudry (2017), Train longer, generalize better: closing the generalization
  gap in large batch training of neural networks, NeurIPS, arXiv:1705.08741 (ghost batches).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.batch_normalize import KernelConfig, normalize

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_state",
]

Array = jax.Array


class BatchNormState(NamedTuple):
    """Running statistics of a batch-norm layer (a pytree; pass it in, get it back).

    Attributes:
      mean: running mean, shape = the feature shape (e.g. (C,)), float32 (float64 under x64).
      var: running variance, same shape; biased unless the layer stores the unbiased one.
      count: int32 scalar, number of batches folded into the running statistics.
      skipped: int32 scalar, number of training batches whose statistics were not finite (or
        that had fewer than two valid values in every feature) and were therefore left out of
        the running statistics.

    Example:
      >>> x = jnp.array([[1.0], [3.0]])                    # batch mean 2, biased variance 1
      >>> _, state = batch_norm(x, batch_norm_state(1), training=True, momentum=0.5)
      >>> state.mean.tolist(), state.var.tolist(), int(state.count), int(state.skipped)
      ([1.0], [1.0], 1, 0)
    """

    mean: Array
    var: Array
    count: Array
    skipped: Array


def batch_norm_state(num_features: int | Sequence[int], dtype=None) -> BatchNormState:
    """A fresh state: mean 0, variance 1, nothing counted.

    Args:
      num_features: channels C, or the feature shape for several feature axes (0 is a layer
        without features, e.g. for an (N, 0) input).
      dtype: statistics dtype; default float32 (float64 when x64 is enabled).

    Example:
      >>> state = batch_norm_state(64)
      >>> state.mean.shape, state.var.dtype
      ((64,), dtype('float32'))
    """
    if isinstance(num_features, (list, tuple)):
        shape = tuple(checks.as_int(n, "num_features") for n in num_features)
    else:
        shape = (checks.as_int(num_features, "num_features"),)
    if any(n < 0 for n in shape):
        # 0 is a layer without features (e.g. an (N, 0) input): nothing to normalize, valid.
        raise ValueError(f"`num_features` must be non-negative, got {num_features!r}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if dtype not in checks.STATISTICS_DTYPES:
        raise TypeError(
            f"`dtype` of running statistics must be float32 or float64, got {dtype}: "
            f"statistics are kept in float32 whatever the input dtype."
        )
    return BatchNormState(
        mean=jnp.zeros(shape, dtype),
        var=jnp.ones(shape, dtype),
        count=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


class BatchLayout(NamedTuple):
    """Where the features sit in the (ghost, batch, ...) view of the input."""

    feature_axes: tuple[int, ...]  # of the original input
    feature_shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]  # (num_ghost, ghost_size, *x.shape[1:])
    reduction_axes: tuple[int, ...]  # of the grouped view: everything but ghost and features
    param_shape: tuple[int, ...]  # scale/bias/statistics broadcast shape in the grouped view


def batch_layout(x, axis, ghost_batch_size) -> BatchLayout:
    """The `BatchLayout` of `x` for feature `axis` and ghost batches of `ghost_batch_size`
    (None: one group); raises a ValueError naming the argument when they do not fit `x`."""
    feature_axes = checks.normalize_axes(axis, x.ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    batch = x.shape[0]
    if ghost_batch_size is None:
        num_ghost = 1
    else:
        if 0 in feature_axes:
            raise ValueError("`ghost_batch_size` splits axis 0, so `axis` must not include 0.")
        try:
            ghost_batch_size = checks.as_int(ghost_batch_size, "ghost_batch_size")
        except TypeError as error:
            raise ValueError(
                f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}."
            ) from error
        if ghost_batch_size < 1:
            raise ValueError(
                f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}."
            )
        if batch % ghost_batch_size:
            raise ValueError(
                f"`ghost_batch_size`={ghost_batch_size} does not divide the batch of {batch} "
                f"(x.shape={tuple(x.shape)}); pick a divisor of {batch} or pad the batch and mask."
            )
        # An empty batch is one empty ghost batch: no statistics, as without ghost batches.
        num_ghost = max(batch // ghost_batch_size, 1)
    grouped_shape = (num_ghost, batch // num_ghost, *x.shape[1:])
    grouped_features = tuple(a + 1 for a in feature_axes)
    reduction_axes = tuple(a for a in range(1, x.ndim + 1) if a not in grouped_features)
    param_shape = tuple(
        grouped_shape[a] if a in grouped_features else 1 for a in range(len(grouped_shape))
    )
    return BatchLayout(feature_axes, feature_shape, grouped_shape, reduction_axes, param_shape)


def grouped_mask(mask, x, layout: BatchLayout) -> Array | None:
    """Brings a mask broadcastable to x (flax's rule, `checks.broadcast_mask`) into the grouped
    view, as booleans."""
    mask = checks.broadcast_mask(mask, x)
    return None if mask is None else mask.reshape(layout.grouped_shape)


def check_state(state: BatchNormState, feature_shape, axis) -> BatchNormState:
    """Raises unless `state` is a BatchNormState whose mean and var are float arrays with
    `feature_shape`; returns it with Python-int counters as int32 arrays."""
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"`state` must be a BatchNormState (from bnjax.batch_norm_state), got {type(state)}."
        )
    checks.check_statistics(state, ("mean", "var"), feature_shape, axis, "batch_norm_state")
    return checks.as_counters(state, ("count", "skipped"), "batch_norm_state")


def as_param(param, layout: BatchLayout, fill: float, dtype) -> Array:
    """A per-feature array (scale, bias, a statistic; feature shape) in `dtype`, reshaped to
    broadcast in the grouped view; None gives the constant `fill` instead."""
    if param is None:
        return jnp.full(layout.param_shape, fill, dtype)
    return param.astype(dtype).reshape(layout.param_shape)


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
    """One boolean: every value of every array is finite."""
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in arrays])


def running_update(
    state: BatchNormState,
    batch: BatchUpdate,
    momentum: float | None,
    guard: checks.StateGuard | None = None,
) -> BatchNormState:
    """Folds one batch's statistics into the state, per feature, unless they are not finite.

    Features the batch could not estimate (`batch.estimated` False: fewer than two valid
    values) keep their running statistics. A batch whose estimated statistics are not finite,
    or that estimated no feature at all, is left out and counted in `skipped`. A state that is
    itself not finite (`guard.finite` False; no guard: tested here) cannot be updated: it is
    returned unchanged, with neither `count` nor `skipped` advanced.
    """
    if guard is None:
        guard = checks.StateGuard(all_finite(state.mean, state.var), 0)
    new_mean, new_var = averaged_statistics(
        state.mean, state.var, batch.mean, batch.var, state.count, momentum
    )
    new_mean = jnp.where(batch.estimated, new_mean, state.mean)
    new_var = jnp.where(batch.estimated, new_var, state.var)
    folded = all_finite(new_mean, new_var) & batch.any_estimated
    return BatchNormState(
        mean=jnp.where(folded, new_mean, state.mean),
        var=jnp.where(folded, new_var, state.var),
        count=state.count + folded.astype(jnp.int32),
        skipped=state.skipped + (~folded & guard.finite).astype(jnp.int32) + guard.alert,
    )


class TrainingPlan(NamedTuple):
    """Where a training call's statistics come from and where its state update is synced.

    Without ghost batches the kernel merges statistics over `axis_name` and the update needs no
    traffic (its inputs are already global). With ghost batches the statistics stay local and
    only the update's average runs over `axis_name`, so the replicated state stays identical.
    """

    kernel: KernelConfig
    update_axis_name: object
    update_axis_index_groups: tuple[tuple[int, ...], ...] | None
    epsilon: Array | None = None  # a traced epsilon, passed to the kernel as an operand


def plan_training(
    x,
    layout: BatchLayout,
    *,
    function: str,
    axis,
    epsilon,
    axis_name,
    axis_index_groups,
    ghost_batch_size,
) -> TrainingPlan:
    """Checks a training call's statistics are well defined and says how to compute them."""
    local = ghost_batch_size is not None
    if axis_name is None or local:
        values_per_statistic = math.prod(layout.grouped_shape[a] for a in layout.reduction_axes)
        checks.check_not_single_value(
            values_per_statistic,
            f"{function} in training mode on x of shape {tuple(x.shape)} with axis={axis!r}"
            + (f" and ghost_batch_size={ghost_batch_size}" if local else ""),
            "Use training=False (running statistics), a larger batch, or axis_name to share "
            "statistics across devices.",
        )
    if axis_name is not None:
        stats.check_axis_name_bound(axis_name)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    # A known epsilon is a static option (a constant in the compiled program); a traced one
    # (e.g. a jit argument) cannot be, and is passed to the kernel as an operand instead.
    static_epsilon = checks.concrete_value(epsilon)
    kernel = KernelConfig(
        reduction_axes=layout.reduction_axes,
        epsilon=None if static_epsilon is None else float(static_epsilon),
        axis_name=None if local else axis_name,
        axis_index_groups=None if local else groups,
    )
    return TrainingPlan(
        kernel,
        axis_name if local else None,
        groups if local else None,
        epsilon if static_epsilon is None else None,
    )


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


def evaluate(
    x: Array,
    state: BatchNormState,
    scale: Array | None,
    bias: Array | None,
    *,
    epsilon,
    layout: BatchLayout,
    function: str,
) -> Array:
    """``scale * (x - state.mean) / sqrt(state.var + epsilon) + bias`` in the statistics
    dtype, with y in x's dtype (the checked arguments of an evaluation call).

    A known running variance (eager, or closed over) is read once: a negative one would give
    NaN, so it raises a ValueError naming `state.var`. A traced one is not read.
    """
    checks.check_known_statistics(state, ("var",), function, finite=False)
    dtype = stats.stats_dtype(x.dtype)
    feature_view = [1] * x.ndim
    for a in layout.feature_axes:
        feature_view[a] = x.shape[a]
    inv = lax.rsqrt(state.var.astype(stats.real_dtype(dtype)) + epsilon)
    if scale is not None:
        inv = inv * scale.astype(dtype)
    y = (x.astype(dtype) - state.mean.astype(dtype).reshape(feature_view)) * inv.reshape(
        feature_view
    )
    if bias is not None:
        y = y + bias.astype(dtype).reshape(feature_view)
    return y.astype(x.dtype)


def batch_norm(
    x: Array,
    state: BatchNormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: int | None = None,
    mask: Array | None = None,
    use_unbiased_running_var: bool = False,
) -> tuple[Array, BatchNormState]:
    """Batch normalization: ``y = scale * (x - mu) / sqrt(var + epsilon) + bias``.

    Args:
      x: input, e.g. (N, H, W, C) with `axis=-1`, (N, C, H, W) with `axis=1`, or (N, D).
        Any floating dtype; statistics are computed in float32 (float64 for float64 inputs)
        with a two-pass variance, and `y` has `x`'s dtype.
      state: BatchNormState whose mean/var have the feature shape (see `batch_norm_state`).
      scale: optional (C,) parameter (the feature shape); None means 1.
      bias: optional (C,) parameter (the feature shape); None means 0.
      training: True normalizes with the batch's statistics and updates the state; False uses
        the running statistics and returns `state` unchanged. Required, on purpose.
      momentum: decay of the running average (flax/Keras convention, PyTorch 0.1 == ours 0.9);
        None for a cumulative average of all batches seen.
      epsilon: added to the variance before the square root.
      axis: feature axis or axes (statistics are per feature, reduced over the others).
      axis_name: inside `pmap`/`shard_map`, the mapped axis whose devices share statistics
        (exact merge of (count, mean, m2), so ragged or masked shards are handled). None gives
        per-device statistics.
      axis_index_groups: sub-groups of devices that share statistics (pmap only).
      ghost_batch_size: normalize each consecutive group of this many examples with its own
        statistics (ghost batch norm / local statistics); the running statistics take the mean
        of the groups' statistics. With `axis_name`, groups stay local; only that mean is synced.
      mask: booleans broadcastable to x (NumPy rules, as flax: a per-example mask for x of
        shape (N, ..., C) is ``mask.reshape(N, 1, ..., 1)``); False entries are left
        out of the statistics but still normalized. Their values never reach the statistics or
        the state, even NaN; keep them finite if you differentiate (0 * NaN is NaN in any
        backward pass, so a NaN there makes the batch's gradients NaN). A feature left with
        fewer than two valid values keeps its running statistics (the variance of one value
        is 0, not an estimate); the other features are updated.
      use_unbiased_running_var: store ``var * n / (n - 1)`` in the state, like PyTorch.

    Returns:
      (y, new_state). In training mode a batch whose statistics are not finite, or that has
      fewer than two valid values in every feature, leaves the running statistics untouched
      and increments `state.skipped` (y may then be non-finite). A known negative `state.var`
      (eager calls, or a state closed over under a transform) raises a ValueError in either
      mode, as it would give NaN; a traced one is not read.
      Running statistics that are already not finite when they come in can never recover,
      and are no fault of the batch: when their values are known (eager calls) training
      raises a ValueError naming the field; when they are traced (jit, vmap, pmap, shard_map)
      the state comes back unchanged with neither `count` nor `skipped` advanced, and on CPU
      and TPU a RuntimeWarning names the field at run time (a host callback that runs only
      then; best effort: it may be dropped when the new state is unused). Reset them with
      `bnjax.lifecycle.reset_statistics` or `batch_norm_state`.

    Example:
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> y, state = batch_norm(x, batch_norm_state(3), training=True)
      >>> y.mean(axis=0).round(6).tolist(), state.count.item()
      ([0.0, 0.0, 0.0], 1)
    """
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    training = checks.check_training(training)
    checks.check_epsilon(epsilon)
    checks.check_momentum(momentum)
    checks.check_axis_name(axis_name, axis_index_groups)
    if x.ndim < 2:
        raise ValueError(
            f"`x` must have a batch axis and a feature axis, got shape {tuple(x.shape)}; "
            f"for a single feature vector use x[None]."
        )
    # Ghost batches only shape training statistics; evaluation ignores them.
    layout = batch_layout(x, axis, ghost_batch_size if training else None)
    given_state, state = state, check_state(state, layout.feature_shape, axis)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, layout.feature_shape, "scale", "axis", input_dtype=x.dtype)
    checks.check_param_shape(bias, layout.feature_shape, "bias", "axis", input_dtype=x.dtype)
    use_unbiased_running_var = checks.check_option_flag(
        use_unbiased_running_var, "use_unbiased_running_var"
    )
    if not training:
        y = evaluate(x, state, scale, bias, epsilon=epsilon, layout=layout, function="batch_norm")
        return y, given_state

    guard = checks.guard_statistics(state, ("mean", "var"), "batch_norm")
    dtype = stats.stats_dtype(x.dtype)
    plan = plan_training(
        x,
        layout,
        function="batch_norm",
        axis=axis,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
    )
    grouped_y, mean, var, count = normalize(
        x.reshape(layout.grouped_shape),
        as_param(scale, layout, 1.0, dtype),
        as_param(bias, layout, 0.0, dtype),
        grouped_mask(mask, x, layout),
        plan.kernel,
        plan.epsilon,
    )
    update = batch_statistics_for_update(
        lax.stop_gradient(mean),
        lax.stop_gradient(var),
        count,
        layout,
        plan,
        use_unbiased_running_var=use_unbiased_running_var,
    )
    new_state = running_update(state, update, momentum, guard)
    return grouped_y.reshape(x.shape), new_state
