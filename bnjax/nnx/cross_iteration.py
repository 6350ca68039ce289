"""flax.nnx CrossIterationConvBatchNorm: a conv followed by cross-iteration batch norm."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers
from flax.nnx.nn import linear as nnx_linear
from flax.typing import Dtype, Initializer

from bnjax.core.checks import as_int
from bnjax.core.cross_iteration_batch_norm import (
    CrossIterationState,
    convolution,
    cross_iteration_batch_norm,
    cross_iteration_state,
)
from bnjax.module_common import check_use_running_average


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class CrossIterationConvBatchNorm(nnx.Module):
    """A conv (nnx.Conv's arguments, no bias) followed by cross-iteration batch norm
    (`bnjax.cross_iteration_batch_norm`), one module since the norm needs the conv's kernel
    and input; the nnx twin of `bnjax.linen.CrossIterationConvBatchNorm`.

    State: ``nnx.Param`` ``kernel`` (*kernel_size, in_features / groups, out_features),
    ``scale``, ``bias`` (out_features,); ``nnx.BatchStat`` ``mean``, ``var`` and the window
    (``past_mean``, ``past_var``, ``past_mean_grad``, ``past_var_grad``, ``past_mean_offset``,
    ``past_var_offset``) with
    int32 ``step``, ``count``, ``skipped`` (`bnjax.CrossIterationState`'s fields).

    Example:
      >>> layer = CrossIterationConvBatchNorm(3, 8, (3, 3), rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
      >>> y = layer(x)                                      # training: fills the window
      >>> y.shape, int(layer.step[...]), layer.past_mean_grad[...].shape
      ((4, 6, 6, 8), 1, (3, 3, 3, 3, 8))
    """

    in_features: int = dataclasses.field(kw_only=False)
    """Input channels C_in."""
    out_features: int = dataclasses.field(kw_only=False)
    """Output channels C (the normalized features)."""
    kernel_size: int | Sequence[int] = dataclasses.field(kw_only=False)
    """The conv window, e.g. (3, 3)."""
    strides: int | Sequence[int] = 1
    """As in nnx.Conv."""
    padding: Any = "SAME"
    """'SAME', 'VALID', an int, or per spatial axis an int or a (low, high) pair."""
    input_dilation: int | Sequence[int] = 1
    """As in nnx.Conv."""
    kernel_dilation: int | Sequence[int] = 1
    """As in nnx.Conv."""
    feature_group_count: int = 1
    """As in nnx.Conv."""
    kernel_init: dataclasses.InitVar[Initializer] = nnx_linear.default_kernel_init
    """Initializer of the kernel (nnx.Conv's default)."""
    use_running_average: bool | None = False
    """True evaluates with the running statistics; ``model.train()`` / ``model.eval()``."""
    window: int = 4
    """Steps pooled (the paper's k; 1 is plain batch norm)."""
    burn_in: int | None = None
    """Training steps of plain batch norm first (None: window - 1)."""
    momentum: float | None = 0.99
    """Decay of the running average (flax's convention)."""
    epsilon: float = 1e-5
    """Added to the variance before the square root."""
    dtype: Dtype | None = None
    """Computation and output dtype (None: promote x and the parameters)."""
    param_dtype: Dtype = jnp.float32
    """dtype of the created parameters."""
    use_scale: bool = True
    """Learn a per-channel scale (else 1)."""
    use_bias: bool = True
    """Learn a per-channel bias (else 0)."""
    scale_init: dataclasses.InitVar[Initializer] = initializers.ones
    """Initializer of the scale."""
    bias_init: dataclasses.InitVar[Initializer] = initializers.zeros
    """Initializer of the bias."""
    axis_name: str | None = None
    """The mapped axis (pmap, shard_map) whose devices form the global batch."""
    axis_index_groups: Any = None
    """Sub-groups of the devices of `axis_name` (pmap only)."""
    rngs: dataclasses.InitVar[nnx.Rngs]
    """Keys for the initializers: kernel, then scale, then bias."""

    def __post_init__(self, kernel_init, scale_init, bias_init, rngs):
        window_shape = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        groups = as_int(self.feature_group_count, "feature_group_count")
        if self.in_features % groups:
            raise ValueError(
                f"`feature_group_count`={groups} must divide in_features={self.in_features}."
            )
        shape = (*window_shape, self.in_features // groups, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, self.param_dtype))
        channels = (self.out_features,)
        self.scale = (
            nnx.Param(scale_init(rngs.params(), channels, self.param_dtype))
            if self.use_scale
            else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), channels, self.param_dtype))
            if self.use_bias
            else nnx.data(None)
        )
        for field, value in cross_iteration_state(shape, self.window)._asdict().items():
            setattr(self, field, nnx.BatchStat(value))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """x (N, *spatial, in_features) -> (N, *spatial', out_features); `mask` broadcasts to
        the output (per example: (N, 1, ..., 1))."""
        use_running_average = check_use_running_average(use_running_average)
        if use_running_average is None:
            use_running_average = check_use_running_average(self.use_running_average)
        training = not use_running_average
        kernel = self.kernel[...]
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, kernel, scale, bias = nnx_dtypes.promote_dtype(
            (jnp.asarray(x), kernel, scale, bias), dtype=self.dtype
        )
        conv = convolution(
            kernel.ndim - 2,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
        )
        fields = CrossIterationState._fields
        state = CrossIterationState(*(getattr(self, field)[...] for field in fields))
        y, new = cross_iteration_batch_norm(
            x,
            kernel,
            state,
            scale,
            bias,
            conv=conv,
            training=training,
            burn_in=self.burn_in,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
        if training:
            for field in fields:
                getattr(self, field)[...] = getattr(new, field)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: True evaluates with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
