"""flax.nnx GroupNorm, LayerNorm, RMSNorm and InstanceNorm: statistics per example, no state."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax.typing import Axes

from bnjax.core import (
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from bnjax.core.checks import as_int, normalize_axes
from bnjax.module_common import check_instance_feature_axes
from bnjax.nnx._shared import (
    _Module,
    _WithBias,
)


def _feature_shaped(x, params, feature_axes):
    """`params` (scale, bias; None stays None) in the shape of x along `feature_axes`. flax's
    constructor takes one int `num_features` (the product, for several feature axes) and
    reshapes the flat parameters at call time; bnjax takes that and a tuple alike."""
    axes = normalize_axes(feature_axes, jnp.ndim(x), "feature_axes")
    shape = tuple(jnp.shape(x)[a] for a in axes)

    def reshape(param):
        if param is None or param.shape == shape or param.size != math.prod(shape):
            return param  # a mismatch is reported by the core, naming the argument
        return param.reshape(shape)

    return tuple(map(reshape, params))


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class GroupNorm(_WithBias):
    """Group normalization (`bnjax.group_norm`), a drop-in for ``flax.nnx.GroupNorm``.

    Args:
      num_features: channels C (the last axis).
      num_groups, group_size: exactly one, dividing C (flax's default num_groups=32).
      reduction_axes: as in flax: None (all but the first axis) or axes that include the last;
        axes left out act as batch axes.
      epsilon (1e-6), dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
        promote_dtype, rngs, bias_metadata, scale_metadata: as in flax.
      axis_name, axis_index_groups: merge the statistics over a mapped axis (exact).
      use_fast_variance: accepted; statistics are always exact two-pass float32.

    Example:
      >>> gn = GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))
      >>> gn(jnp.ones((2, 4, 8)).at[:, 0].set(3.0)).shape
      (2, 4, 8)
    """

    num_groups: int | None = dataclasses.field(default=32, kw_only=False)
    """Number of groups G (flax's default 32); give it or `group_size`."""
    group_size: int | None = dataclasses.field(default=None, kw_only=False)
    """Channels per group instead of `num_groups`."""
    epsilon: float = 1e-6
    """Added to the variance (flax's default 1e-6)."""
    reduction_axes: Axes | None = None
    """None (every axis but the first) or axes that include the last."""

    def __post_init__(self, *init_only):
        num_groups, group_size = self.num_groups, self.group_size
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                f"Give exactly one of `num_groups` and `group_size` (got num_groups="
                f"{num_groups}, group_size={group_size}); pass num_groups=None with group_size."
            )
        divisor = num_groups if group_size is None else group_size
        divisor = as_int(divisor, "num_groups" if group_size is None else "group_size")
        if divisor < 1 or self.num_features % divisor:
            raise ValueError(
                f"`num_groups`/`group_size`={divisor} must divide num_features={self.num_features}."
            )
        super().__post_init__(*init_only)
        self.num_groups = divisor if group_size is None else self.num_features // divisor
        self.group_size = self.num_features // self.num_groups

    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask`: booleans broadcastable to x."""
        x, scale, bias, out_dtype = self._inputs(x)
        y = group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            axis=-1,
            reduction_axes=self.reduction_axes,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class LayerNorm(_WithBias):
    """Layer normalization (`bnjax.layer_norm`), a drop-in for ``flax.nnx.LayerNorm``.

    Args:
      num_features: size of x along `feature_axes` (scale and bias shape).
      epsilon (1e-6), dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
        reduction_axes (-1), feature_axes (-1), promote_dtype, rngs, bias_metadata,
        scale_metadata: as in flax.
      axis_name, axis_index_groups: merge the statistics over a mapped axis (exact).
      use_fast_variance: accepted; statistics are always exact two-pass float32.

    Example:
      >>> print(LayerNorm(3, rngs=nnx.Rngs(0))(jnp.array([[1.0, 2.0, 3.0]])))
      [[-1.224744  0.        1.224744]]
    """

    epsilon: float = 1e-6
    """Added to the variance (flax's default 1e-6)."""
    reduction_axes: Axes = -1
    """The axes each statistic runs over."""
    feature_axes: Axes = -1
    """The axes along which scale and bias vary."""

    def __call__(self, x, *, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x, scale, bias, out_dtype = self._inputs(x)
        scale, bias = _feature_shaped(x, (scale, bias), self.feature_axes)
        y = layer_norm(
            x,
            scale,
            bias,
            epsilon=self.epsilon,
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class RMSNorm(_Module):
    """RMS normalization (`bnjax.rms_norm`), a drop-in for ``flax.nnx.RMSNorm``.

    Args:
      num_features: size of x along `feature_axes` (scale shape).
      epsilon (1e-6), dtype, param_dtype, use_scale, scale_init, reduction_axes (-1),
        feature_axes (-1), promote_dtype, rngs, scale_metadata: as in flax.
      axis_name, axis_index_groups: merge the mean square over a mapped axis (exact).
      use_fast_variance: accepted; the mean square is float32.

    Example:
      >>> print(RMSNorm(2, epsilon=1e-12, rngs=nnx.Rngs(0))(jnp.array([[3.0, 4.0]])))
      [[0.84852815 1.1313709 ]]
    """

    epsilon: float = 1e-6
    """Added to the mean square (flax's default 1e-6)."""
    reduction_axes: Axes = -1
    """The axes the mean square runs over."""
    feature_axes: Axes = -1
    """The axes along which scale varies."""

    def __post_init__(self, *init_only):
        self.use_bias = False  # no bias, as flax's RMSNorm (the attribute says so)
        super().__post_init__(*init_only)

    def __call__(self, x, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x, scale, _, out_dtype = self._inputs(x)
        (scale,) = _feature_shaped(x, (scale,), self.feature_axes)
        y = rms_norm(
            x,
            scale,
            epsilon=self.epsilon,
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class InstanceNorm(_WithBias):
    """Instance normalization (`bnjax.instance_norm`), a drop-in for ``flax.nnx.InstanceNorm``.

    Statistics per example and feature over the other non-batch axes.

    Args:
      num_features: size of x along `feature_axes` (scale and bias shape).
      epsilon (1e-6), dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
        feature_axes (-1; any axes but 0), promote_dtype, rngs, bias_metadata,
        scale_metadata: as in flax.
      axis_name, axis_index_groups: merge the statistics over a mapped axis (exact).
      use_fast_variance: accepted; statistics are always exact two-pass float32.

    Example:
      >>> layer = InstanceNorm(4, rngs=nnx.Rngs(0))
      >>> layer(jnp.arange(16.0).reshape(1, 2, 2, 4)).std(axis=(1, 2)).round(3)
      Array([[1., 1., 1., 1.]], dtype=float32)
    """

    epsilon: float = 1e-6
    """Added to the variance (flax's default 1e-6)."""
    feature_axes: Axes = -1
    """The feature axes (any but 0, the batch axis)."""

    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        check_instance_feature_axes(self.feature_axes, x.ndim)
        x, scale, bias, out_dtype = self._inputs(x)
        scale, bias = _feature_shaped(x, (scale, bias), self.feature_axes)
        y = instance_norm(
            x,
            scale,
            bias,
            epsilon=self.epsilon,
            axis=self.feature_axes,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)
