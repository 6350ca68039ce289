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

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.batch_layout import BatchLayout, as_param, batch_layout, grouped_mask
from bnjax.core.batch_normalize import KernelConfig, normalize
from bnjax.core.running_update import batch_statistics_for_update, running_update
from bnjax.core.state_guard import check_known_statistics, deferred_guard_statistics

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


def check_state(state: BatchNormState, feature_shape, axis) -> BatchNormState:
    """Raises unless `state` is a BatchNormState whose mean and var are float arrays with
    `feature_shape`; returns it with Python-int counters as int32 arrays."""
    if not isinstance(state, BatchNormState):
        raise TypeError(
            f"`state` must be a BatchNormState (from bnjax.batch_norm_state), got {type(state)}."
        )
    checks.check_statistics(state, ("mean", "var"), feature_shape, axis, "batch_norm_state")
    return checks.as_counters(state, ("count", "skipped"), "batch_norm_state")


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
    known = checks.known_values(epsilon)
    static_epsilon = None if known is None else known[0]
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
    check_known_statistics(state, ("var",), function, finite=False)
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


class CheckedCall(NamedTuple):
    """The arguments of a `batch_norm` or `batch_renorm` call, checked and converted."""

    x: Array
    state: NamedTuple  # the state with Python-int counters as int32 arrays
    scale: Array | None
    bias: Array | None
    layout: BatchLayout
    training: bool
    use_unbiased_running_var: bool


def check_call(
    x,
    state,
    scale,
    bias,
    *,
    check_state: Callable,
    training,
    momentum,
    epsilon,
    axis,
    axis_name,
    axis_index_groups,
    ghost_batch_size,
    use_unbiased_running_var,
) -> CheckedCall:
    """The checks `batch_norm` and `batch_renorm` share, in the order their errors are raised:
    x, the mode, epsilon, momentum, the device axis, x's rank, the layout (axis, ghost
    batches), the state (`check_state(state, feature_shape, axis)`, the one part that differs),
    scale and bias, then the option flag. Each raises naming its argument."""
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
    state = check_state(state, layout.feature_shape, axis)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, layout.feature_shape, "scale", "axis", input_dtype=x.dtype)
    checks.check_param_shape(bias, layout.feature_shape, "bias", "axis", input_dtype=x.dtype)
    use_unbiased_running_var = checks.check_option_flag(
        use_unbiased_running_var, "use_unbiased_running_var"
    )
    return CheckedCall(x, state, scale, bias, layout, training, use_unbiased_running_var)


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
    given_state = state
    x, state, scale, bias, layout, training, use_unbiased_running_var = check_call(
        x,
        state,
        scale,
        bias,
        check_state=check_state,
        training=training,
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
        use_unbiased_running_var=use_unbiased_running_var,
    )
    if not training:
        y = evaluate(x, state, scale, bias, epsilon=epsilon, layout=layout, function="batch_norm")
        return y, given_state

    guard = deferred_guard_statistics(state, ("mean", "var"), "batch_norm")
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
