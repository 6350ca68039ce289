"""flax.linen GroupNorm, LayerNorm, RMSNorm and InstanceNorm: statistics per example, no state."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from bnjax.core import (
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from bnjax.linen._shared import (
    _feature_shape,
    _PerExample,
)
from bnjax.module_common import check_instance_feature_axes


class GroupNorm(_PerExample):
    """Group normalization (`bnjax.group_norm`), a drop-in for ``flax.linen.GroupNorm``.

    Statistics per example and group of channels (the last axis), over `reduction_axes`.

    Attributes:
      num_groups, group_size, epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
      scale_init: as in flax (give exactly one of num_groups and group_size).
      reduction_axes: as in flax: None (every axis but the first) or axes that include the
        last; axes left out act as batch axes (e.g. (0, 1, 3, 4) for an unbatched input).
      axis_name, axis_index_groups: merge the statistics over a mapped axis whose devices
        hold parts of each example (exact (count, mean, m2) merge).
      use_fast_variance, force_float32_reductions: accepted; statistics are exact float32.

    Example:
      >>> x = jnp.arange(2 * 4 * 8, dtype=jnp.float32).reshape(2, 4, 8)
      >>> GroupNorm(num_groups=2).init_with_output(jax.random.key(0), x)[0].shape
      (2, 4, 8)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        x, scale, bias, out_dtype = self._prepare(x, (x.shape[-1],))
        y = group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=self.group_size,
            epsilon=self.epsilon,
            axis=-1,
            reduction_axes=self.reduction_axes,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


class LayerNorm(_PerExample):
    """Layer normalization (`bnjax.layer_norm`), a drop-in for ``flax.linen.LayerNorm``.

    Statistics over `reduction_axes`; scale and bias vary along `feature_axes`.

    Attributes:
      epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, reduction_axes,
      feature_axes: as in flax. axis_name, axis_index_groups: merge the statistics over a
      mapped axis whose devices hold parts of each example (exact (count, mean, m2) merge).
      use_fast_variance, force_float32_reductions: accepted; statistics are exact float32.

    Example:
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> print(LayerNorm().init_with_output(jax.random.key(0), x)[0])
      [[-1.224744  0.        1.224744]]
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.feature_axes, "feature_axes")
        x, scale, bias, out_dtype = self._prepare(x, feature_shape)
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


class RMSNorm(_PerExample):
    """RMS normalization (`bnjax.rms_norm`), a drop-in for ``flax.linen.RMSNorm``.

    ``y = scale * x / sqrt(mean(|x|^2) + epsilon)`` over `reduction_axes`; no bias.

    Attributes:
      epsilon, dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes: as in
      flax. axis_name, axis_index_groups: merge the mean square over a mapped axis (exact).
      use_fast_variance, force_float32_reductions: accepted; the mean square is float32.

    Example:
      >>> x = jnp.array([[3.0, 4.0]])
      >>> print(RMSNorm(epsilon=1e-12).init_with_output(jax.random.key(0), x)[0])
      [[0.84852815 1.1313709 ]]
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    use_bias = False  # for the shared scale/bias creation: RMSNorm has no bias
    bias_init = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.feature_axes, "feature_axes")
        x, scale, _, out_dtype = self._prepare(x, feature_shape)
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


class InstanceNorm(_PerExample):
    """Instance normalization (`bnjax.instance_norm`), a drop-in for ``flax.linen.InstanceNorm``.

    Statistics per example and feature over every other non-batch axis (e.g. H, W of NHWC).

    Attributes:
      epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, feature_axes: as
      in flax (any axes but the batch axis 0). axis_name, axis_index_groups: merge the
      statistics over a mapped axis whose devices hold parts of each example (exact merge).
      use_fast_variance, force_float32_reductions: accepted; statistics are exact float32.

    Example:
      >>> x = jnp.arange(16.0).reshape(1, 2, 2, 4)
      >>> InstanceNorm().init_with_output(jax.random.key(0), x)[0].std(axis=(1, 2)).round(3)
      Array([[1., 1., 1., 1.]], dtype=float32)
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        check_instance_feature_axes(self.feature_axes, x.ndim)
        feature_shape = _feature_shape(x, self.feature_axes, "feature_axes")
        x, scale, bias, out_dtype = self._prepare(x, feature_shape)
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
