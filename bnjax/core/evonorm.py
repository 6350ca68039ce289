"""EvoNorm-B0 and EvoNorm-S0: normalization and activation in one layer.

With s2_A(x) the (biased) variance of x over the axes A, for x of shape (N, ..., C):

    B0:  y = x / max(sqrt(s2_{N,spatial}(x) + eps), v * x + sqrt(s2_{spatial}(x) + eps))
             * scale + bias
    S0:  y = x * sigmoid(v * x) / sqrt(s2_{spatial, group}(x) + eps) * scale + bias

B0's first variance is the batch variance of each channel (over the batch and the spatial
axes, as batch norm's; synchronised across devices with `axis_name` by the exact merge of
(count, mean, m2)), the second the instance variance (per example and channel, over the
spatial axes). In evaluation the batch variance is the running one of the state. S0's variance
is per example and group of channels, over the spatial axes and the group's channels (group
norm's statistics): it is batch independent and has no state. v, scale and bias are (C,).

Without an activation (``v=None``) the layers are their normalizations alone, the form a norm
takes where no activation follows it (before a residual addition):

    B0:  y = x / sqrt(s2_{N,spatial}(x) + eps) * scale + bias
    S0:  y = x / sqrt(s2_{spatial, group}(x) + eps) * scale + bias

Running variance (bnjax's convention, as batch norm's): ``var = momentum * var + (1 -
momentum) * batch_var`` (momentum = decay; None: the plain average of every batch seen); the
biased batch variance is stored. A training batch whose variance is not finite, or that has
fewer than two valid values in every channel, leaves the running variance untouched and counts
in `skipped`; incoming running variances that are not finite are never updated (see
`bnjax.core.state_guard`).

References:
  Liu, Brock, Simonyan & Le (2020), Evolving Normalization-Activation Layers, NeurIPS,
  arXiv:2004.02967: the EvoNorm-B0 and EvoNorm-S0 expressions of its table of evolved layers
  and Figure 1 (S0's computation graph); s_w,h,c/g is the group variance, s_b,w,h the batch
  variance, each std taken as sqrt(s2 + eps).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.filter_response_norm import (
    channel_layout,
    channel_view,
    check_channel_param,
    check_real,
)
from bnjax.core.group_norm import _inverse_std, group_moments, group_values_to_channels
from bnjax.core.running_update import MIN_VALUES_PER_ESTIMATE, all_finite, counters_after
from bnjax.core.state_guard import check_known_statistics, guard_statistics

__all__ = ["EvoNormB0State", "evonorm_b0", "evonorm_b0_state", "evonorm_s0"]

Array = jax.Array


class EvoNormB0State(NamedTuple):
    """The running batch variance of an EvoNorm-B0 layer (a pytree; pass it in, get it back).

    Attributes:
      var: running (biased) batch variance per channel, (C,), float32 (float64 under x64).
      count: int32 scalar, training batches folded into `var`.
      skipped: int32 scalar, training batches left out (non-finite variance, or fewer than
        two valid values in every channel).

    Example:
      >>> x = jnp.array([[1.0], [3.0]])                         # batch variance 1
      >>> _, state = evonorm_b0(x, evonorm_b0_state(1), training=True, momentum=0.5)
      >>> state.var.tolist(), int(state.count), int(state.skipped)
      ([1.0], 1, 0)
    """

    var: Array
    count: Array
    skipped: Array


def evonorm_b0_state(num_features: int, dtype=None) -> EvoNormB0State:
    """A fresh state: running variance 1, nothing counted.

    Args:
      num_features: channels C.
      dtype: statistics dtype; default float32 (float64 when x64 is enabled).

    Example:
      >>> evonorm_b0_state(16).var.shape
      (16,)
    """
    num_features = checks.as_int(num_features, "num_features")
    if num_features < 0:
        raise ValueError(f"`num_features` must be non-negative, got {num_features}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if dtype not in checks.STATISTICS_DTYPES[:2]:
        raise TypeError(
            f"`dtype` of the running variance must be float32 or float64, got {dtype}: "
            f"statistics are kept in float32 whatever the input dtype."
        )
    zero = jnp.zeros((), jnp.int32)
    return EvoNormB0State(var=jnp.ones((num_features,), dtype), count=zero, skipped=zero)


def _check_state(state, channels: int, axis) -> EvoNormB0State:
    if not isinstance(state, EvoNormB0State):
        raise TypeError(
            f"`state` must be an EvoNormB0State (from bnjax.evonorm_b0_state), got "
            f"{type(state).__name__}."
        )
    checks.check_statistics(state, ("var",), (channels,), axis, "evonorm_b0_state")
    return checks.as_counters(state, ("count", "skipped"), "evonorm_b0_state")


def _running_variance(state, batch_var, count, momentum, guard) -> EvoNormB0State:
    """`state` with one batch's variance averaged in, per channel, guarded as batch norm's."""
    estimated = count >= MIN_VALUES_PER_ESTIMATE
    batch_var = batch_var.astype(state.var.dtype)
    if momentum is None:
        averaged = state.var + (batch_var - state.var) / (state.count + 1).astype(state.var.dtype)
    else:
        averaged = momentum * state.var + (1.0 - momentum) * batch_var
    new_var = jnp.where(estimated, averaged, state.var)
    any_estimated = jnp.any(estimated) if estimated.size else True
    folded = all_finite(new_var) & any_estimated
    return state._replace(
        var=jnp.where(folded, new_var, state.var), **counters_after(state, folded, guard)
    )


def evonorm_b0(
    x: Array,
    state: EvoNormB0State,
    scale: Array | None = None,
    bias: Array | None = None,
    v: Array | None = None,
    *,
    training: bool,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis: int = -1,
    axis_name=None,
    axis_index_groups=None,
    mask: Array | None = None,
) -> tuple[Array, EvoNormB0State]:
    """EvoNorm-B0: ``x / max(sqrt(batch_var + eps), v * x + sqrt(instance_var + eps))``.

    Args:
      x: (N, ..., C) with `axis=-1` (NHWC), or the channels at `axis`. Any real floating
        dtype; statistics are float32 (float64 for float64 x), two-pass; y has x's dtype.
      state: EvoNormB0State of C channels (see `evonorm_b0_state`).
      scale: optional (C,) gamma; None means 1.
      bias: optional (C,) beta; None means 0.
      v: optional (C,) v1 of the paper; None drops the activation term, giving
        ``x / sqrt(batch_var + eps) * scale + bias`` (a norm not followed by an activation).
      training: True uses the batch variance and updates the state; False the running one
        (the state comes back unchanged). Required, on purpose.
      momentum: decay of the running variance (flax/Keras convention; PyTorch's 0.1 is our
        0.9); None for the cumulative average of all batches seen.
      epsilon: added to both variances inside the square roots.
      axis: the channel axis (an int, not 0).
      axis_name: inside `pmap`/`shard_map`, the mapped axis whose devices share the batch
        variance (exact merge of (count, mean, m2); ragged or masked shards are handled).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).
      mask: booleans broadcastable to x (flax's rule; per example: ``mask.reshape(N, 1, ...,
        1)``); False values stay out of both variances and are still normalized.

    Returns:
      (y, new_state), y with x's shape and dtype.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> scale, bias, v = jnp.ones(3), jnp.zeros(3), jnp.ones(3)
      >>> y, state = evonorm_b0(x, evonorm_b0_state(3), scale, bias, v, training=True)
      >>> y.shape, int(state.count)
      ((8, 4, 4, 3), 1)
    """
    given_state = state
    x = jnp.asarray(x)
    check_real(x)
    training = checks.check_training(training)
    checks.check_epsilon(epsilon)
    checks.check_momentum(momentum)
    checks.check_axis_name(axis_name, axis_index_groups)
    channel_axis, spatial = channel_layout(x, axis, "evonorm_b0")
    channels = x.shape[channel_axis]
    state = _check_state(state, channels, axis)
    scale = check_channel_param(scale, channels, "scale", x.dtype)
    bias = check_channel_param(bias, channels, "bias", x.dtype)
    v = check_channel_param(v, channels, "v", x.dtype)
    mask = checks.broadcast_mask(mask, x)
    dtype = stats.stats_dtype(x.dtype)
    batch_axes = (0, *spatial)

    def per_channel(param):
        return channel_view(param, x.ndim, channel_axis, channels, dtype)

    if training:
        if axis_name is None:
            checks.check_not_single_value(
                math.prod(x.shape[a] for a in batch_axes),
                f"evonorm_b0 in training mode on x of shape {tuple(x.shape)}",
                "Use training=False (running variance), a larger batch, or axis_name to "
                "share the batch variance across devices.",
            )
        guard = guard_statistics(state, ("var",), "evonorm_b0")
        batch = stats.reduce_moments(x, batch_axes, mask, axis_name, axis_index_groups)
        batch_var = batch.m2 / jnp.maximum(batch.count, 1)
        new_state = _running_variance(
            state,
            lax.stop_gradient(batch_var).reshape(channels),
            batch.count.reshape(channels),
            momentum,
            guard,
        )
    else:
        check_known_statistics(state, ("var",), "evonorm_b0", finite=False)
        batch_var = per_channel(state.var)
        new_state = given_state
    denominator = jnp.sqrt(batch_var.astype(dtype) + epsilon)
    if v is not None:
        instance = stats.moments(x, spatial, mask)
        instance_std = jnp.sqrt(instance.m2 / jnp.maximum(instance.count, 1) + epsilon)
        denominator = jnp.maximum(denominator, per_channel(v) * x.astype(dtype) + instance_std)
    y = x.astype(dtype) / denominator
    if scale is not None:
        y = y * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    return y.astype(x.dtype), new_state


def _group_inverse_std(x, channel_axis, spatial, num_groups, epsilon, mask, axis_name, groups):
    """1 / sqrt(group variance + eps) per example and group, broadcast to x's channels (the
    moments of `bnjax.group_norm`: per-channel moments merged exactly per group)."""
    merged = group_moments(x, channel_axis, spatial, num_groups, mask, axis_name, groups)
    return group_values_to_channels(_inverse_std(merged, epsilon), x.shape, channel_axis, spatial)


def evonorm_s0(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    v: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    epsilon: float = 1e-5,
    axis: int = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """EvoNorm-S0: ``x * sigmoid(v * x) / sqrt(group_var + eps) * scale + bias``.

    Args:
      x: (N, ..., C) with `axis=-1`, or the channels at `axis`. Any real floating dtype;
        statistics are float32 (float64 for float64 x); y has x's dtype.
      scale: optional (C,) gamma; None means 1.
      bias: optional (C,) beta; None means 0.
      v: optional (C,) v1 of the paper; None drops the activation (``x / group_std``).
      num_groups: groups G of channels (the paper's 32); C must be divisible by it.
      group_size: channels per group instead of `num_groups` (give exactly one).
      epsilon: added to the group variance inside the square root.
      axis: the channel axis (an int, not 0).
      mask: booleans broadcastable to x; False values stay out of the group variance.
      axis_name: merge the group moments over this mapped axis, for devices that hold parts
        of each example (exact (count, mean, m2) merge).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).

    Returns:
      y with x's shape and dtype; every statistic is per example (batch independent).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> evonorm_s0(x, v=jnp.ones(8), num_groups=2).shape
      (2, 4, 4, 8)
    """
    x = jnp.asarray(x)
    check_real(x)
    checks.check_epsilon(epsilon)
    checks.check_axis_name(axis_name, axis_index_groups)
    channel_axis, spatial = channel_layout(x, axis, "evonorm_s0")
    channels = x.shape[channel_axis]
    num_groups = checks.group_count(channels, num_groups, group_size, axis)
    scale = check_channel_param(scale, channels, "scale", x.dtype)
    bias = check_channel_param(bias, channels, "bias", x.dtype)
    v = check_channel_param(v, channels, "v", x.dtype)
    mask = checks.broadcast_mask(mask, x)
    dtype = stats.stats_dtype(x.dtype)

    def per_channel(param):
        return channel_view(param, x.ndim, channel_axis, channels, dtype)

    inv = _group_inverse_std(
        x, channel_axis, spatial, num_groups, epsilon, mask, axis_name, axis_index_groups
    )
    y = x.astype(dtype)
    if v is not None:
        y = y * jax.nn.sigmoid(per_channel(v) * y)
    y = y * inv
    if scale is not None:
        y = y * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    return y.astype(x.dtype)
