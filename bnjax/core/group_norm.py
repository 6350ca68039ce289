"""Group, layer, instance and RMS normalization: per-example statistics, no state.

The first three standardize each example over a set of axes and then apply a per-feature
affine map; RMS norm only rescales:

    y = scale * (x - mean) / sqrt(var + epsilon) + bias          (group, layer, instance)
    y = scale * x / sqrt(mean(|x|^2) + epsilon)                   (rms)

- group_norm: the channels are split into G groups; statistics per (example, group) over the
  spatial axes and the C/G channels of the group (Wu & He, 2018).
- instance_norm: group_norm with one channel per group (statistics per example and channel).
- layer_norm: statistics per example over `reduction_axes` (default: the last axis, as flax and
  PyTorch's `normalized_shape=(C,)`).

They behave identically in training and evaluation, so they need no state. Statistics are
float32 (float64 for float64 inputs; complex inputs get a complex mean and the real variance
``E|x - mean|^2``) with the two-pass variance of `bnjax.core.stats`; the output has the input's
dtype. Gradients come from autodiff.

Options shared by all four, with flax's meaning:

- `mask`: booleans broadcastable to x (NumPy rules, trailing axes align); False values stay out
  of the statistics and are still normalized. Values whose statistic has no valid value at all
  normalize to 0 (the output is the bias; RMS: 0) with gradient 0; flax gives NaN there, which
  reaches the gradients of every weight upstream through 0 * NaN.
- `axis_name` / `axis_index_groups`: inside `pmap`/`shard_map`, statistics whose reduction
  axes are split over devices (sequence or tensor parallelism) are merged exactly across the
  devices of that axis: (count, mean, m2) for the variance, (count, sum of squares) for RMS.
  Devices must hold the same examples along the axes that are not reduced.

A statistic over one value (e.g. instance norm of an input without spatial axes) has variance 0
and erases the input; it is computed as flax does, with a warning at trace time.

References:
  Wu & He (2018), Group Normalization, ECCV, arXiv:1803.08494.
  Ba, Kiros & Hinton (2016), Layer Normalization, arXiv:1607.06450.
  Ulyanov, Vedaldi & Lempitsky (2016), Instance Normalization: The Missing Ingredient for Fast
  Stylization, arXiv:1607.08022.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bnjax.core import checks, stats

__all__ = [
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]

Array = jax.Array


def _warn_if_single_value(num_values: int, where: str) -> None:
    if num_values == 1:
        warnings.warn(
            f"{where} computes each statistic from a single value: the variance is 0 and the "
            f"output is the bias alone, whatever the input.",
            stacklevel=4,
        )


def _affine(y: Array, scale, bias, feature_axes: tuple[int, ...], out_dtype) -> Array:
    view = [1] * y.ndim
    for a in feature_axes:
        view[a] = y.shape[a]
    if scale is not None:
        y = y * scale.astype(y.dtype).reshape(view)
    if bias is not None:
        y = y + bias.astype(y.dtype).reshape(view)
    return y.astype(out_dtype)


def _check_common(x, epsilon, axis_name, axis_index_groups):
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    checks.check_epsilon(epsilon)
    checks.check_axis_name(axis_name, axis_index_groups)
    return x


def _check_affine(scale, bias, feature_shape, axes_name, input_dtype):
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, feature_shape, "scale", axes_name, input_dtype=input_dtype)
    checks.check_param_shape(bias, feature_shape, "bias", axes_name, input_dtype=input_dtype)
    return scale, bias


def _standardize(x, reduce, epsilon, mask, axis_name, axis_index_groups) -> Array:
    """(x - mean) / sqrt(var + epsilon) over `reduce` (and devices), in the statistics dtype."""
    moments = stats.reduce_moments(x, reduce, mask, axis_name, axis_index_groups)
    inv = _inverse_std(moments, epsilon)
    return (x.astype(moments.mean.dtype) - moments.mean) * inv


def _inverse_std(moments: stats.Moments, epsilon) -> Array:
    """`stats.inverse_root` of the (biased) variance of `moments` (0 with no valid value)."""
    return stats.inverse_root(moments.count, moments.m2 / jnp.maximum(moments.count, 1), epsilon)


def group_moments(
    x: Array, channel_axis: int, spatial, num_groups: int, mask, axis_name, axis_index_groups
) -> stats.Moments:
    """The moments of each example's channel groups: over the `spatial` axes and the channels
    of each of `num_groups` groups of `channel_axis` (synchronised over `axis_name`).

    Shapes: x's, with each `spatial` axis 1 and `channel_axis` of size `num_groups`.
    """
    size = x.shape[channel_axis] // num_groups
    channel_view = tuple(1 if a in spatial else n for a, n in enumerate(x.shape))
    small = [*channel_view[:channel_axis], num_groups, size, *channel_view[channel_axis + 1 :]]
    if axis_name is None:
        # Per-channel two-pass moments over the other reduction axes of the plain x, then an
        # exact (Chan) merge of the channels of each group on the small arrays: every
        # full-size pass is a plain per-channel reduction or elementwise loop, which XLA runs
        # well, and no grouped copy of x is made.
        per_channel = stats.moments(x, spatial, mask)
        return stats.combine(
            stats.Moments(*(f.reshape(small) for f in per_channel)), axis=channel_axis + 1
        )
    # Across devices: the moments of each group at once, so that the one-round merge gets
    # the shifted moments it needs to stay exact (see `stats.merge_across_devices`).
    grouped = (*x.shape[:channel_axis], num_groups, size, *x.shape[channel_axis + 1 :])
    axes = (*(a if a < channel_axis else a + 1 for a in spatial), channel_axis + 1)
    merged = stats.reduce_moments(
        x.reshape(grouped),
        tuple(sorted(axes)),
        None if mask is None else mask.reshape(grouped),
        axis_name,
        axis_index_groups,
    )
    return stats.Moments(*(jnp.squeeze(f, channel_axis + 1) for f in merged))


def group_values_to_channels(values: Array, x_shape, channel_axis: int, spatial) -> Array:
    """Per-group `values` (shaped as `group_moments`' fields) repeated over each group's
    channels: x's shape with each `spatial` axis 1."""
    num_groups = values.shape[channel_axis]
    size = x_shape[channel_axis] // num_groups
    channel_view = tuple(1 if a in spatial else n for a, n in enumerate(x_shape))
    small = [*channel_view[:channel_axis], num_groups, size, *channel_view[channel_axis + 1 :]]
    return jnp.broadcast_to(jnp.expand_dims(values, channel_axis + 1), small).reshape(channel_view)


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    epsilon: float = 1e-6,
    axis: int = -1,
    reduction_axes: int | Sequence[int] | None = None,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """Group normalization over the channels of `axis` split into groups.

    Args:
      x: (N, ..., C) with `axis=-1` (any layout with the channels at `axis`).
      scale: optional (C,) parameter; None means 1.
      bias: optional (C,) parameter; None means 0.
      num_groups: number of groups G (flax's default 32); C must be divisible by it.
      group_size: channels per group instead of `num_groups` (give exactly one of the two).
      epsilon: added to the variance (flax's default 1e-6; PyTorch uses 1e-5).
      axis: the channel axis.
      reduction_axes: the axes each statistic runs over besides the group's channels; they
        must include `axis`. None: every axis but the first. Axes left out act as batch axes
        (flax's rule), e.g. (0, 1, 3, 4) on an unbatched (T, H, W, ..., C) input.
      mask: booleans broadcastable to x; False values stay out of the statistics.
      axis_name: merge the statistics over this mapped axis (see the module docstring).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).

    Returns:
      y with x's shape and dtype; statistics per group and per index of the axes outside
      `reduction_axes` (per example and group by default).

    Example:
      >>> y = group_norm(jnp.ones((2, 4, 4, 8)).at[:, 0].set(3.0), num_groups=2)
      >>> y.shape
      (2, 4, 4, 8)
    """
    x = _check_common(x, epsilon, axis_name, axis_index_groups)
    if x.ndim < 1 or (x.ndim < 2 and reduction_axes is None):
        # The default statistics run over every axis but the first, the batch axis: a 1-D x
        # has nothing left but that axis, whatever `axis` says.
        raise ValueError(
            f"group_norm expects x of shape (N, ..., C) (ndim >= 2: a batch axis first, and the "
            f"channel axis), got x of shape {tuple(x.shape)}; for one example pass "
            f"x[None], or name the axes each statistic runs over with reduction_axes=..."
        )
    channel_axes = checks.normalize_axes(axis, x.ndim, "axis")
    if len(channel_axes) != 1:
        raise TypeError(
            f"`axis` is the one channel axis and must be an int, got {axis!r}; for statistics "
            f"over several axes use layer_norm(x, reduction_axes=..., feature_axes=...)."
        )
    (channel_axis,) = channel_axes
    if reduction_axes is None:
        if channel_axis == 0:
            raise ValueError("`axis` is the channel axis and must not be the batch axis 0.")
        reduce = tuple(range(1, x.ndim))
    else:
        reduce = checks.normalize_axes(reduction_axes, x.ndim, "reduction_axes")
        if channel_axis not in reduce:
            raise ValueError(
                f"`reduction_axes`={reduction_axes!r} must include the channel axis "
                f"(axis={axis!r}): each group's statistics run over its channels."
            )
    channels = x.shape[channel_axis]
    num_groups = checks.group_count(channels, num_groups, group_size, axis)
    scale, bias = _check_affine(scale, bias, (channels,), "axis", x.dtype)
    mask = checks.broadcast_mask(mask, x)
    spatial = tuple(a for a in reduce if a != channel_axis)
    _warn_if_single_value(
        channels // num_groups * math.prod(x.shape[a] for a in spatial),
        f"group_norm on x of shape {tuple(x.shape)} with {num_groups} groups",
    )
    merged = group_moments(x, channel_axis, spatial, num_groups, mask, axis_name, axis_index_groups)
    inv = _inverse_std(merged, epsilon)

    def to_channels(v):
        return group_values_to_channels(v, x.shape, channel_axis, spatial)

    y = (x.astype(merged.mean.dtype) - to_channels(merged.mean)) * to_channels(inv)
    return _affine(y, scale, bias, (channel_axis,), x.dtype)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-6,
    reduction_axes: int | Sequence[int] = -1,
    feature_axes: int | Sequence[int] = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """Layer normalization: statistics over `reduction_axes`, one per index of the others.

    Args:
      x: any floating array, e.g. (N, D) or (N, H, W, C).
      scale: optional parameter with the shape of x along `feature_axes`; None means 1.
      bias: optional parameter with that shape; None means 0.
      epsilon: added to the variance (flax's default 1e-6).
      reduction_axes: axes the statistics run over (default -1; (1, 2, 3) for a whole NHWC map).
      feature_axes: axes along which scale and bias vary (default -1, as flax).
      mask: booleans broadcastable to x; False values stay out of the statistics.
      axis_name: merge the statistics over this mapped axis (see the module docstring).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).

    Example:
      >>> print(layer_norm(jnp.array([[1.0, 2.0, 3.0]])))
      [[-1.224744  0.        1.224744]]
    """
    x = _check_common(x, epsilon, axis_name, axis_index_groups)
    reduce = checks.normalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = checks.normalize_axes(feature_axes, x.ndim, "feature_axes")
    scale, bias = _check_affine(
        scale, bias, tuple(x.shape[a] for a in features), "feature_axes", x.dtype
    )
    mask = checks.broadcast_mask(mask, x)
    _warn_if_single_value(
        math.prod(x.shape[a] for a in reduce),
        f"layer_norm on x of shape {tuple(x.shape)} with reduction_axes={reduction_axes!r}",
    )
    y = _standardize(x, reduce, epsilon, mask, axis_name, axis_index_groups)
    return _affine(y, scale, bias, features, x.dtype)


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-6,
    axis: int | Sequence[int] = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """Instance normalization: statistics per example and feature over the other axes.

    The statistics run over every axis but the batch axis 0 and the feature axes (the spatial
    axes H, W of NHWC).

    Args:
      x: (N, H, W, C) with `axis=-1` (any number of spatial axes).
      scale: optional parameter with the shape of x along `axis`; None means 1.
      bias: optional parameter with that shape; None means 0.
      epsilon: added to the variance.
      axis: the feature axis or axes (flax's `feature_axes`); must not include 0.
      mask: booleans broadcastable to x; False values stay out of the statistics.
      axis_name: merge the statistics over this mapped axis (see the module docstring).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).

    Example:
      >>> instance_norm(jnp.arange(16.0).reshape(1, 2, 2, 4)).std(axis=(1, 2)).round(3).tolist()
      [[1.0, 1.0, 1.0, 1.0]]
    """
    x = _check_common(x, epsilon, axis_name, axis_index_groups)
    features = checks.normalize_axes(axis, x.ndim, "axis")
    if 0 in features:
        raise ValueError(
            f"`axis`={axis!r} (the feature axes) must not include the leading dimension, the "
            f"batch axis; NHWC uses axis=-1, NCHW axis=1."
        )
    reduce = tuple(a for a in range(1, x.ndim) if a not in features)
    scale, bias = _check_affine(scale, bias, tuple(x.shape[a] for a in features), "axis", x.dtype)
    mask = checks.broadcast_mask(mask, x)
    _warn_if_single_value(
        math.prod(x.shape[a] for a in reduce),
        f"instance_norm on x of shape {tuple(x.shape)} with feature axis {axis!r}",
    )
    y = _standardize(x, reduce, epsilon, mask, axis_name, axis_index_groups)
    return _affine(y, scale, bias, features, x.dtype)


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    epsilon: float = 1e-6,
    reduction_axes: int | Sequence[int] = -1,
    feature_axes: int | Sequence[int] = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """RMS normalization: ``y = scale * x / sqrt(mean(|x|^2) + epsilon)`` (no centring).

    Args:
      x: any floating array, e.g. (N, T, D).
      scale: optional parameter with the shape of x along `feature_axes`; None means 1.
      epsilon: added to the mean square (flax's default 1e-6).
      reduction_axes: axes the mean square runs over (default -1).
      feature_axes: axes along which `scale` varies (default -1).
      mask: booleans broadcastable to x; False values stay out of the mean square.
      axis_name: merge the mean square over this mapped axis (counts and sums, exact).
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).

    Returns:
      y with x's shape and dtype; the mean square is float32 (float64 for float64 x).

    References:
      Zhang & Sennrich (2019), Root Mean Square Layer Normalization, NeurIPS,
      arXiv:1910.07467.

    Example:
      >>> print(rms_norm(jnp.array([[3.0, 4.0]]), epsilon=1e-12))
      [[0.84852815 1.1313709 ]]
    """
    x = _check_common(x, epsilon, axis_name, axis_index_groups)
    reduce = checks.normalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = checks.normalize_axes(feature_axes, x.ndim, "feature_axes")
    scale, _ = _check_affine(
        scale, None, tuple(x.shape[a] for a in features), "feature_axes", x.dtype
    )
    mask = checks.broadcast_mask(mask, x)
    count, square = stats.mean_square(x, reduce, mask, axis_name, axis_index_groups)
    inv = stats.inverse_root(count, square, epsilon)
    y = x.astype(stats.stats_dtype(x.dtype)) * inv
    return _affine(y, scale, None, features, x.dtype)
