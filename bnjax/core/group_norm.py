"""Group, layer and instance normalization: per-example statistics, no state.

All three standardize each example over a set of axes and then apply a per-feature affine map:

    y = scale * (x - mean) / sqrt(var + epsilon) + bias

- group_norm: the channels are split into G groups; statistics per (example, group) over the
  spatial axes and the C/G channels of the group (Wu & He, 2018).
- instance_norm: group_norm with one channel per group (statistics per example and channel).
- layer_norm: statistics per example over `reduction_axes` (default: the last axis, as flax and
  PyTorch's `normalized_shape=(C,)`).

They behave identically in training and evaluation, so they need no state. Statistics are
float32 (float64 for float64 inputs) with the two-pass variance of `bnjax.core.stats`; the
output has the input's dtype. Gradients come from autodiff.

References:
  Wu & He (2018), Group Normalization, ECCV, arXiv:1803.08494.
  Ba, Kiros & Hinton (2016), Layer Normalization, arXiv:1607.06450.
  Ulyanov, Vedaldi & Lempitsky (2016), Instance Normalization: The Missing Ingredient for Fast
  Stylization, arXiv:1607.08022.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats

__all__ = [
    "group_norm",
    "instance_norm",
    "layer_norm",
]

Array = jax.Array


def _standardize(x: Array, reduction_axes: tuple[int, ...], epsilon: float) -> Array:
    """(x - mean) / sqrt(var + epsilon) over `reduction_axes`, in the statistics dtype."""
    moments = stats.moments(x, reduction_axes)
    inv = lax.rsqrt(moments.variance() + epsilon)
    return (x.astype(moments.mean.dtype) - moments.mean) * inv


def _affine(y: Array, scale, bias, feature_axes: tuple[int, ...], out_dtype) -> Array:
    view = [1] * y.ndim
    for a in feature_axes:
        view[a] = y.shape[a]
    if scale is not None:
        y = y * scale.astype(y.dtype).reshape(view)
    if bias is not None:
        y = y + bias.astype(y.dtype).reshape(view)
    return y.astype(out_dtype)


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    epsilon: float = 1e-6,
    axis: int = -1,
) -> Array:
    """Group normalization over the channels of `axis` split into groups.

    Args:
      x: (N, ..., C) with `axis=-1` (or any layout with the batch first and channels at `axis`).
      scale, bias: optional (C,) parameters; None means 1 and 0.
      num_groups: number of groups G (flax's default 32); C must be divisible by it.
      group_size: channels per group instead of `num_groups` (give exactly one of the two).
      epsilon: added to the variance (flax's default 1e-6; PyTorch uses 1e-5).
      axis: the channel axis.

    Returns:
      y with x's shape and dtype; statistics per (example, group) over all non-batch axes.

    Example:
      >>> y = group_norm(jnp.ones((2, 4, 4, 8)).at[:, 0].set(3.0), num_groups=2)
      >>> y.shape
      (2, 4, 4, 8)
    """
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    checks.check_epsilon(epsilon)
    if x.ndim < 2:
        raise ValueError(f"`x` must be (N, ..., C), got shape {tuple(x.shape)}.")
    channel_axes = checks.normalize_axes(axis, x.ndim, "axis")
    if len(channel_axes) != 1:
        raise TypeError(
            f"`axis` is the one channel axis and must be an int, got {axis!r}; for statistics "
            f"over several axes use layer_norm(x, reduction_axes=..., feature_axes=...)."
        )
    (channel_axis,) = channel_axes
    if channel_axis == 0:
        raise ValueError("`axis` is the channel axis and must not be the batch axis 0.")
    channels = x.shape[channel_axis]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"Give exactly one of `num_groups` and `group_size` (got num_groups={num_groups}, "
            f"group_size={group_size}); e.g. group_size=None to use num_groups."
        )
    # NumPy (and concrete JAX) integers are ints here; bools are not.
    if num_groups is not None:
        num_groups = checks.as_int(num_groups, "num_groups")
    if group_size is not None:
        group_size = checks.as_int(group_size, "group_size")
    if group_size is not None:
        if group_size < 1 or channels % group_size:
            raise ValueError(
                f"`group_size`={group_size} must divide the {channels} channels of axis "
                f"{axis}; divisors are {[d for d in range(1, channels + 1) if channels % d == 0]}."
            )
        num_groups = channels // group_size
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"`num_groups`={num_groups} must divide the {channels} channels of axis {axis}; "
            f"divisors are {[d for d in range(1, channels + 1) if channels % d == 0]}."
        )
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, (channels,), "scale", "axis")
    checks.check_param_shape(bias, (channels,), "bias", "axis")
    grouped_shape = (
        *x.shape[:channel_axis],
        num_groups,
        channels // num_groups,
        *x.shape[channel_axis + 1 :],
    )
    reduction_axes = tuple(a for a in range(1, len(grouped_shape)) if a != channel_axis)
    checks.check_not_single_value(
        math.prod(grouped_shape[a] for a in reduction_axes),
        f"group_norm on x of shape {tuple(x.shape)} with {num_groups} groups",
        "Use fewer groups, or layer_norm for inputs without spatial axes.",
    )
    spatial = tuple(a for a in range(1, x.ndim) if a != channel_axis)
    if spatial:
        # Per-channel two-pass moments over the spatial axes of the plain (N, ..., C) view,
        # then an exact (Chan) merge of the channels of each group on the small arrays, and
        # the group statistics repeated back to channels: every full-size pass is a plain
        # per-channel reduction or elementwise loop, which XLA:CPU runs well.
        per_channel = stats.moments(x, spatial)  # fields shaped like x with spatial dims 1
        small = list(grouped_shape)
        for a in spatial:
            small[a if a < channel_axis else a + 1] = 1
        merged = stats.combine(
            stats.Moments(*(f.reshape(small) for f in per_channel)), axis=channel_axis + 1
        )
        inv = lax.rsqrt(merged.m2 / merged.count + epsilon)

        def to_channels(v):
            v = jnp.broadcast_to(jnp.expand_dims(v, channel_axis + 1), small)
            return v.reshape(per_channel.mean.shape)

        y = (x.astype(per_channel.mean.dtype) - to_channels(merged.mean)) * to_channels(inv)
    else:
        y = _standardize(x.reshape(grouped_shape), reduction_axes, epsilon).reshape(x.shape)
    return _affine(y, scale, bias, (channel_axis,), x.dtype)


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-6,
    axis: int = -1,
) -> Array:
    """Instance normalization: statistics per example and channel over the spatial axes.

    Args:
      x: (N, H, W, C) with `axis=-1` (any number of spatial axes, at least one).
      scale, bias: optional (C,) parameters.
      epsilon: added to the variance.
      axis: the channel axis.

    Example:
      >>> instance_norm(jnp.arange(16.0).reshape(1, 2, 2, 4)).std(axis=(1, 2)).round(3).tolist()
      [[1.0, 1.0, 1.0, 1.0]]
    """
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            f"instance_norm needs spatial axes, e.g. (N, H, W, C); got shape {tuple(x.shape)}. "
            f"Without them each statistic would come from one value: use layer_norm."
        )
    return group_norm(x, scale, bias, num_groups=None, group_size=1, epsilon=epsilon, axis=axis)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-6,
    reduction_axes: int | Sequence[int] = -1,
    feature_axes: int | Sequence[int] = -1,
) -> Array:
    """Layer normalization: statistics per example over `reduction_axes`.

    Args:
      x: any floating array, e.g. (N, D) or (N, H, W, C).
      scale, bias: optional parameters with the shape of x along `feature_axes`.
      epsilon: added to the variance (flax's default 1e-6).
      reduction_axes: axes the statistics run over (default -1; (1, 2, 3) for a whole NHWC map).
      feature_axes: axes along which scale and bias vary (default -1, as flax).

    Example:
      >>> print(layer_norm(jnp.array([[1.0, 2.0, 3.0]])))
      [[-1.224744  0.        1.224744]]
    """
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    checks.check_epsilon(epsilon)
    reduce = checks.normalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = checks.normalize_axes(feature_axes, x.ndim, "feature_axes")
    feature_shape = tuple(x.shape[a] for a in features)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, feature_shape, "scale", "feature_axes")
    checks.check_param_shape(bias, feature_shape, "bias", "feature_axes")
    checks.check_not_single_value(
        math.prod(x.shape[a] for a in reduce),
        f"layer_norm on x of shape {tuple(x.shape)} with reduction_axes={reduction_axes!r}",
        "Reduce over more axes, e.g. reduction_axes=(1, 2, 3) for an NHWC feature map.",
    )
    return _affine(_standardize(x, reduce, epsilon), scale, bias, features, x.dtype)
