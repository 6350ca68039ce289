"""Filter response normalization with its thresholded linear unit (FRN + TLU).

Per example n and channel c, over the spatial positions i of that channel (N_s of them):

    nu2[n, c] = sum_i x[n, i, c]^2 / N_s                          (mean square, no centring)
    y = scale * x / sqrt(nu2 + epsilon_eff) + bias
    z = max(y, threshold)                                         (TLU: a learned floor)

with ``epsilon_eff = epsilon + |learned_epsilon|`` when a learned epsilon is given (the paper's
variant for activations without spatial extent), else ``epsilon``. No statistic crosses
examples, so an example's output never depends on the rest of its batch, and training and
evaluation are the same function (there is no state).

Inputs without spatial extent (N, C), or 1x1 maps: nu2 is then x^2 itself and, with a small
fixed epsilon, ``x / sqrt(x^2 + epsilon)`` is about sign(x), which erases the input. The paper
learns epsilon there; `filter_response_norm` therefore refuses such an input unless
`learned_epsilon` is given (a ValueError naming it), and `bnjax.linen.FilterResponseNorm`
learns it on its own for such inputs.

References:
  Singh & Krishnan (2020), Filter Response Normalization Layer: Eliminating Batch Dependence
  in the Training of Deep Neural Networks, CVPR, arXiv:1911.09737: Sec. 3, the equations of
  nu2 (mean squared norm), x_hat = x / sqrt(nu2 + epsilon), y = gamma * x_hat + beta and the
  TLU z = max(y, tau); the learned epsilon for 1x1 activation maps in the same section.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bnjax.core import checks, stats

__all__ = ["filter_response_norm"]

Array = jax.Array


def check_real(x, name: str = "x") -> None:
    """Raises TypeError unless `x` is real floating: these layers compare values (max)."""
    checks.check_floating(x, name)
    if jnp.iscomplexobj(x):
        raise TypeError(
            f"`{name}` is complex ({x.dtype}); this normalizer applies an activation that "
            f"compares values (max or sigmoid), which complex numbers do not have. Pass a "
            f"real `{name}`."
        )


def channel_layout(x, axis, function: str) -> tuple[int, tuple[int, ...]]:
    """(channel axis, spatial axes) of x (N, ..., C): every axis but the batch axis 0 and the
    channel axis is spatial."""
    if x.ndim < 2:
        raise ValueError(
            f"{function} expects x of shape (N, ..., C) (a batch axis first, then the channel "
            f"axis), got x of shape {tuple(x.shape)}; for one example pass x[None]."
        )
    channel_axes = checks.normalize_axes(axis, x.ndim, "axis")
    if len(channel_axes) != 1:
        raise TypeError(f"`axis` is the one channel axis and must be an int, got {axis!r}.")
    (channel_axis,) = channel_axes
    if channel_axis == 0:
        raise ValueError(
            "`axis` is the channel axis and must not be the batch axis 0 (NHWC: -1, NCHW: 1)."
        )
    return channel_axis, tuple(a for a in range(1, x.ndim) if a != channel_axis)


def check_channel_param(param, channels: int, name: str, input_dtype):
    """A per-channel parameter (scale, bias, threshold, v) as an array of shape (C,) or None."""
    param = checks.as_param(param, name)
    checks.check_param_shape(param, (channels,), name, "axis", input_dtype=input_dtype)
    if param is not None:
        check_real(param, name)
    return param


def channel_view(param, x_ndim: int, channel_axis: int, channels: int, dtype) -> Array:
    """A (C,) parameter reshaped to broadcast against x along its channel axis, in `dtype`."""
    shape = [1] * x_ndim
    shape[channel_axis] = channels
    return jnp.asarray(param).astype(dtype).reshape(shape)


def filter_response_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    threshold: Array | None = None,
    *,
    epsilon: float = 1e-6,
    learned_epsilon: Array | None = None,
    axis: int = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Array:
    """FRN + TLU: ``max(scale * x / sqrt(mean(x^2) + epsilon_eff) + bias, threshold)``.

    Args:
      x: (N, ..., C) with `axis=-1` (NHWC), or the channels at `axis` (NCHW: 1). Any real
        floating dtype; the mean square is float32 (float64 for float64 x), the output has
        x's dtype.
      scale: optional (C,) gamma; None means 1.
      bias: optional (C,) beta; None means 0.
      threshold: optional (C,) tau of the TLU ``z = max(y, tau)``; None applies no TLU (the
        normalization alone, e.g. for a norm followed by a residual addition, not by an
        activation).
      epsilon: the fixed part of epsilon, > 0 (the paper's 1e-6).
      learned_epsilon: optional learned epsilon, a scalar or (C,): the normalization uses
        ``epsilon + |learned_epsilon|``. Required when each statistic covers one value
        (no spatial axes, or 1x1 maps), where a fixed epsilon turns y into about sign(x).
      axis: the channel axis (an int, not 0); the mean square runs over every other axis
        but the batch axis 0.
      mask: booleans broadcastable to x; False values stay out of the mean square (e.g.
        padded positions). A statistic with no valid value normalizes to 0 (y = bias).
      axis_name: merge the mean squares over this mapped axis, for devices that hold parts
        of each example (e.g. a spatially sharded image); counts and sums, exact.
      axis_index_groups: sub-groups of the devices of `axis_name` (pmap only).

    Returns:
      z with x's shape and dtype.

    Example:
      >>> x = jnp.array([[[3.0], [-4.0]]])                  # N=1, two positions, C=1
      >>> z = filter_response_norm(x, threshold=jnp.array([-0.5]), epsilon=1e-12)
      >>> [round(value, 4) for value in z[0, :, 0].tolist()]   # x / rms(x): 0.8485, -1.1314
      [0.8485, -0.5]
    """
    x = jnp.asarray(x)
    check_real(x)
    checks.check_epsilon(epsilon)
    checks.check_axis_name(axis_name, axis_index_groups)
    channel_axis, spatial = channel_layout(x, axis, "filter_response_norm")
    channels = x.shape[channel_axis]
    scale = check_channel_param(scale, channels, "scale", x.dtype)
    bias = check_channel_param(bias, channels, "bias", x.dtype)
    threshold = check_channel_param(threshold, channels, "threshold", x.dtype)
    if learned_epsilon is not None:
        learned_epsilon = checks.as_param(learned_epsilon, "learned_epsilon")
        check_real(learned_epsilon, "learned_epsilon")
        if learned_epsilon.shape not in ((), (1,), (channels,)):
            raise ValueError(
                f"`learned_epsilon` must be a scalar or have shape ({channels},) (one per "
                f"channel), got shape {tuple(learned_epsilon.shape)}."
            )
    elif axis_name is None and math.prod(x.shape[a] for a in spatial) == 1:
        raise ValueError(
            f"filter_response_norm on x of shape {tuple(x.shape)} computes each mean square "
            f"from a single value (no spatial extent), where x / sqrt(x^2 + epsilon) is about "
            f"sign(x). Pass learned_epsilon=... (the paper's learned-epsilon variant for "
            f"dense layers and 1x1 maps; the modules take learned_epsilon=True), or "
            f"normalize an input with spatial axes."
        )
    mask = checks.broadcast_mask(mask, x)
    count, nu2 = stats.mean_square(x, spatial, mask, axis_name, axis_index_groups)
    dtype = nu2.dtype

    def per_channel(param):
        return channel_view(param, x.ndim, channel_axis, channels, dtype)

    epsilon_eff = epsilon
    if learned_epsilon is not None:
        learned = jnp.abs(learned_epsilon.astype(dtype))
        epsilon_eff = epsilon + (learned.reshape(()) if learned.size == 1 else per_channel(learned))
    inv = stats.inverse_root(count, nu2, epsilon_eff)
    y = x.astype(dtype) * inv
    if scale is not None:
        y = y * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    if threshold is not None:
        y = jnp.maximum(y, per_channel(threshold))
    return y.astype(x.dtype)
