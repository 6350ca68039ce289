"""flax.linen layers that include their activation: FilterResponseNorm (FRN + TLU), EvoNormS0,
EvoNormB0."""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from bnjax.core import (
    evonorm_b0,
    evonorm_s0,
    filter_response_norm,
)
from bnjax.core.checks import normalize_axes
from bnjax.core.evonorm import EvoNormB0State
from bnjax.linen._shared import (
    _feature_shape,
    _PerExample,
    _RunningStats,
    _values_per_statistic,
)


class _NormActivation(_PerExample):
    """The options of the layers that include their activation (FRN + TLU, EvoNorm): a
    model applies no activation after them (`includes_activation`)."""

    includes_activation: ClassVar[bool] = True

    def _activation_param(self, name, init, shape):
        """The activation's own parameter (TLU threshold, EvoNorm v); None without one."""
        return self.param(name, init, shape, self.param_dtype) if self.activation else None


class FilterResponseNorm(_NormActivation):
    """Filter response normalization with its TLU (`bnjax.filter_response_norm`).

    ``z = max(scale * x / sqrt(mean(x^2) + eps) + bias, threshold)``, the mean square per
    example and channel over the spatial axes: batch independent, the same in training and
    evaluation, no state. It includes its activation (the TLU), so a model applies none after
    it (``includes_activation``).

    Attributes:
      epsilon: the fixed epsilon (the paper's 1e-6).
      learned_epsilon: learn a scalar 'learned_epsilon' param, used as ``epsilon +
        |learned_epsilon|`` (the paper's variant for dense layers and 1x1 maps). None (default):
        learn it exactly when each mean square covers one value (no spatial extent), where a
        fixed epsilon would turn the output into about sign(x); True/False: always/never.
      learned_epsilon_init: its initializer (default the constant 1e-4).
      activation: False drops the TLU (no 'threshold' param): the normalization alone, for a
        norm followed by a residual addition rather than an activation.
      threshold_init: initializer of the TLU's 'threshold' tau (zeros: TLU starts as ReLU).
      axis: the channel axis. dtype, param_dtype, use_bias, use_scale, bias_init, scale_init:
        as in flax's norms. axis_name, axis_index_groups: merge the mean squares over a mapped
        axis whose devices hold parts of each example.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
      >>> y, variables = FilterResponseNorm().init_with_output(jax.random.key(1), x)
      >>> sorted(variables["params"]), bool(jnp.all(y >= 0))    # tau = 0 at init: >= 0
      (['bias', 'scale', 'threshold'], True)
    """

    epsilon: float = 1e-6
    learned_epsilon: bool | None = None
    learned_epsilon_init: Initializer = initializers.constant(1e-4)
    activation: bool = True
    threshold_init: Initializer = initializers.zeros
    axis: int = -1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes x (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        channels = _feature_shape(x, self.axis, "axis")
        threshold = self._activation_param("threshold", self.threshold_init, channels)
        x, scale, bias, out_dtype = self._prepare(x, channels)
        learned = self.learned_epsilon
        if learned is None:
            axes = normalize_axes(self.axis, x.ndim, "axis")
            learned = _values_per_statistic(x.shape, (0, *axes), None) == 1
        learned_epsilon = None
        if learned:
            learned_epsilon = self.param(
                "learned_epsilon", self.learned_epsilon_init, (), self.param_dtype
            )
        y = filter_response_norm(
            x,
            scale,
            bias,
            threshold,
            epsilon=self.epsilon,
            learned_epsilon=learned_epsilon,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


class EvoNormS0(_NormActivation):
    """EvoNorm-S0 (`bnjax.evonorm_s0`): ``x * sigmoid(v * x) / group_std(x) * scale + bias``.

    Group statistics per example (over space and the channels of each group): batch
    independent, no state. It includes its activation, so a model applies none after it.

    Attributes:
      num_groups, group_size: exactly one, dividing the channels (the paper's 32 groups).
      epsilon: added to the group variance (1e-5).
      activation: False drops the swish-like numerator (no 'v' param): ``x / group_std``.
      v_init: initializer of the per-channel 'v' (ones).
      axis, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name,
      axis_index_groups: as in `FilterResponseNorm`.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> y, variables = EvoNormS0(num_groups=4).init_with_output(jax.random.key(1), x)
      >>> sorted(variables["params"]), y.shape
      (['bias', 'scale', 'v'], (2, 4, 4, 8))
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    activation: bool = True
    v_init: Initializer = initializers.ones
    axis: int = -1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x, *, mask=None):
        """Normalizes x (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        channels = _feature_shape(x, self.axis, "axis")
        v = self._activation_param("v", self.v_init, channels)
        x, scale, bias, out_dtype = self._prepare(x, channels)
        y = evonorm_s0(
            x,
            scale,
            bias,
            v,
            num_groups=self.num_groups,
            group_size=self.group_size,
            epsilon=self.epsilon,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


class EvoNormB0(_NormActivation):
    """EvoNorm-B0 (`bnjax.evonorm_b0`), with BatchNorm's mode and running-statistics options.

    ``y = x / max(sqrt(batch_var + eps), v * x + sqrt(instance_var + eps)) * scale + bias``;
    the batch variance per channel in training (``use_running_average=False``, updating
    'batch_stats' unless initializing), the running one in evaluation. It includes its
    activation, so a model applies none after it.

    Variables: 'params' 'scale', 'bias', 'v' (C,); 'batch_stats' 'var' (C,), float32 (and
    int32 'count', 'skipped' with ``track_counters=True``). Train with
    ``mutable=['batch_stats']``, as BatchNorm; `bnjax.lifecycle.recalibrate` sets 'var' to
    the population variance of the layer's input.

    Attributes:
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
      bias_init, scale_init, axis_name, axis_index_groups, track_counters: as in BatchNorm
        (momentum is the decay of the running variance; None: cumulative average, needs
        track_counters).
      activation: False drops the v-term (no 'v' param): ``x / sqrt(batch_var + eps)``.
      v_init: initializer of 'v' (ones).

    Example:
      >>> layer = EvoNormB0(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> jax.tree.map(jnp.shape, variables["batch_stats"])
      {'var': (3,)}
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> bool(jnp.any(updates["batch_stats"]["var"] != 1.0))
      True
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    activation: bool = True
    v_init: Initializer = initializers.ones
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    track_counters: bool = False

    _training = _RunningStats._training
    _counters = _RunningStats._counters
    _store_counters = _RunningStats._store_counters

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x`; `use_running_average` here or as a field (exactly one of them).
        `mask`: booleans broadcastable to x (per example: ``mask.reshape(N, 1, ..., 1)``)."""
        training = self._training(use_running_average)
        x = jnp.asarray(x)
        channels = _feature_shape(x, self.axis, "axis")
        var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
        counters, (count, skipped) = self._counters(training)
        v = self._activation_param("v", self.v_init, channels)
        x, scale, bias, out_dtype = self._prepare(x, channels)
        initializing = self.is_initializing()
        if initializing and _values_per_statistic(x.shape, (self.axis % x.ndim,), None) < 2:
            training = False  # init on one value: shapes only, with the fresh variance
        y, new_state = evonorm_b0(
            x,
            EvoNormB0State(var.value, count, skipped),
            scale,
            bias,
            v,
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        if training and not initializing:
            var.value = new_state.var
            self._store_counters(counters, new_state)
        return y.astype(out_dtype)
