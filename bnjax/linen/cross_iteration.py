"""flax.linen CrossIterationConvBatchNorm: a conv followed by cross-iteration batch norm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from bnjax.core.cross_iteration_batch_norm import (
    CrossIterationState,
    convolution,
    cross_iteration_batch_norm,
    cross_iteration_state,
)
from bnjax.linen._shared import (
    _AffineMixin,
)
from bnjax.module_common import check_use_running_average


class CrossIterationConvBatchNorm(_AffineMixin, nn.Module):
    """A conv (flax.linen.Conv's options, no bias) followed by cross-iteration batch norm
    (`bnjax.cross_iteration_batch_norm`, Yao et al. 2021): the norm needs the conv's kernel and
    input, so the two are one module.

    Training pools the statistics of the last `window` steps, each past one carried to the
    current kernel by its Taylor term (plain batch norm for the first `burn_in` steps);
    evaluation is batch norm's, with running statistics, and folds into the conv.

    Variables: 'params' 'kernel' (*kernel_size, C_in / groups, features), 'scale' and 'bias'
    (features,); 'batch_stats' 'mean' and 'var' (features,), the window ('past_mean',
    'past_var', 'past_mean_offset', 'past_var_offset' (window - 1, features), 'past_mean_grad',
    'past_var_grad' (window - 1, *kernel shape)) and int32 'step', 'count', 'skipped'. Train with
    ``mutable=['batch_stats']``.

    Attributes:
      features, kernel_size, strides, padding, input_dilation, kernel_dilation,
        feature_group_count, kernel_init: as in flax.linen.Conv (channels last).
      window: the k of the paper, steps pooled (1 is plain batch norm). burn_in: steps of plain
        batch norm first (None: window - 1).
      use_running_average, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups: as in BatchNorm.

    Example:
      >>> layer = CrossIterationConvBatchNorm(8, (3, 3), use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> variables["batch_stats"]["past_mean_grad"].shape               # window 4: 3 past
      (3, 3, 3, 3, 8)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> y.shape, int(updates["batch_stats"]["step"])
      ((4, 6, 6, 8), 1)
    """

    features: int | None = None
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    kernel_init: Initializer = nn.linear.default_kernel_init
    use_running_average: bool | None = None
    window: int = 4
    burn_in: int | None = None
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    fuses_conv = True  # the models hand it the conv's input and options (bnjax.models.norms)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """x (N, *spatial, C_in) -> (N, *spatial', features); `mask` broadcasts to the output
        (per example: (N, 1, ..., 1)); False positions stay out of the statistics."""
        training = not nn.merge_param(
            "use_running_average",
            check_use_running_average(self.use_running_average),
            check_use_running_average(use_running_average),
        )
        x = jnp.asarray(x)
        if self.features is None:
            raise ValueError("`features` (the conv's output channels) must be given.")
        window_shape = (
            (self.kernel_size,) * (x.ndim - 2)
            if isinstance(self.kernel_size, int)
            else tuple(self.kernel_size)
        )
        if x.ndim != len(window_shape) + 2:
            raise ValueError(
                f"`x` must be (N, *spatial, C) with {len(window_shape)} spatial axes for "
                f"kernel_size={self.kernel_size!r}, got shape {tuple(x.shape)}."
            )
        if x.shape[-1] % self.feature_group_count:
            raise ValueError(
                f"`feature_group_count`={self.feature_group_count} must divide the input's "
                f"{x.shape[-1]} channels."
            )
        kernel_shape = (*window_shape, x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        fresh = lambda: cross_iteration_state(kernel_shape, self.window)  # noqa: E731
        variables = {
            field: self.variable("batch_stats", field, lambda f=field: getattr(fresh(), f))
            for field in CrossIterationState._fields
        }
        scale, bias = self._scale_and_bias((self.features,))
        out_dtype = canonicalize_dtype(x, kernel, scale, bias, dtype=self.dtype)
        initializing = self.is_initializing()
        if initializing:
            training = False  # init only needs shapes (and may get a batch of one)
        conv = self._conv(len(window_shape))
        state = CrossIterationState(**{f: v.value for f, v in variables.items()})
        y, new_state = cross_iteration_batch_norm(
            x.astype(out_dtype),
            kernel.astype(out_dtype),
            state,
            scale,
            bias,
            conv=conv,
            training=training,
            burn_in=self.burn_in,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
        )
        if training and not initializing:
            for field, variable in variables.items():
                variable.value = getattr(new_state, field)
        return y.astype(out_dtype)

    def _conv(self, spatial: int):
        return convolution(
            spatial,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
        )

    def conv_output(self, x):
        """The conv's output for `x`, before the norm: what the statistics describe (used by
        `bnjax.lifecycle.recalibrate`). Needs the module's variables."""
        kernel = self.get_variable("params", "kernel")
        scale = self.get_variable("params", "scale") if self.use_scale else None
        bias = self.get_variable("params", "bias") if self.use_bias else None
        dtype = canonicalize_dtype(x, kernel, scale, bias, dtype=self.dtype)
        return self._conv(kernel.ndim - 2)(jnp.asarray(x).astype(dtype), kernel.astype(dtype))
