"""flax.nnx layers that include their activation: FilterResponseNorm (FRN + TLU), EvoNormS0,
EvoNormB0."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Initializer

from bnjax.core import (
    evonorm_b0,
    evonorm_s0,
    filter_response_norm,
)
from bnjax.core.evonorm import EvoNormB0State
from bnjax.nnx._shared import (
    _RunningStats,
    _shape,
    _WithBias,
)

_LEARNED_EPSILON_INIT = initializers.constant(1e-4)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class _NormActivation(_WithBias):
    """The options of the layers that include their activation (FRN + TLU, EvoNorm): a
    model applies no activation after them (`includes_activation`)."""

    includes_activation: ClassVar[bool] = True
    activation: bool = True
    """False drops the layer's activation and its parameter (the normalization alone, for a
    norm followed by a residual addition rather than an activation)."""
    axis: int = -1
    """The channel axis (NHWC: -1, NCHW: 1)."""

    def __post_init__(self, *init_only):
        # `_WithBias`'s five InitVars, then the subclass's (`_extra_init`) in declaration order.
        super().__post_init__(*init_only[:5])
        self._create_extra(init_only[1], *init_only[5:])

    def _activation_param(self, rngs, init):
        """The activation's own (C,) parameter (TLU threshold, EvoNorm v), one key as flax."""
        if not self.activation:
            return nnx.data(None)
        return nnx.Param(init(rngs.params(), _shape(self.num_features), self.param_dtype))

    def _create_extra(self, rngs, *inits):
        raise NotImplementedError


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class FilterResponseNorm(_NormActivation):
    """Filter response normalization with its TLU (`bnjax.filter_response_norm`).

    ``z = max(scale * x / sqrt(mean(x^2) + eps) + bias, threshold)``, per example and channel
    over the spatial axes: batch independent, no state, the same in training and evaluation.

    Args:
      num_features: channels C.
      epsilon: the fixed epsilon (1e-6).
      learned_epsilon: learn a scalar ``nnx.Param`` ``learned_epsilon_param`` (linen's
        'learned_epsilon'), used as ``epsilon + |learned_epsilon_param|`` (the paper's
        variant; needed for inputs without spatial extent, which the core refuses otherwise).
      learned_epsilon_init: its initializer (the constant 1e-4).
      threshold_init: initializer of the TLU's ``threshold`` (zeros).
      activation, axis: see `_NormActivation`; dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, promote_dtype, rngs, bias_metadata, scale_metadata: as flax's
        norms; axis_name, axis_index_groups: devices holding parts of each example.

    Example:
      >>> layer = FilterResponseNorm(3, rngs=nnx.Rngs(0))
      >>> bool(jnp.all(layer(jax.random.normal(jax.random.key(0), (2, 4, 4, 3))) >= 0))
      True
    """

    epsilon: float = 1e-6
    """The fixed part of epsilon."""
    learned_epsilon: bool = False
    """Learn ``learned_epsilon`` (scalar): epsilon + |learned_epsilon|."""
    threshold_init: dataclasses.InitVar[Initializer] = initializers.zeros
    """Initializer of the TLU ``threshold``."""
    learned_epsilon_init: dataclasses.InitVar[Initializer] = _LEARNED_EPSILON_INIT
    """Initializer of ``learned_epsilon``."""

    def _create_extra(self, rngs, threshold_init, learned_epsilon_init):
        self.threshold = self._activation_param(rngs, threshold_init)
        self.learned_epsilon_param = (
            nnx.Param(learned_epsilon_init(rngs.params(), (), self.param_dtype))
            if self.learned_epsilon
            else nnx.data(None)
        )

    def __call__(self, x, *, mask=None):
        """Normalizes x (N, ..., C); `mask`: booleans broadcastable to x."""
        x, scale, bias, out_dtype = self._inputs(x)
        threshold = None if self.threshold is None else self.threshold[...]
        learned = self.learned_epsilon_param
        y = filter_response_norm(
            x,
            scale,
            bias,
            threshold,
            epsilon=self.epsilon,
            learned_epsilon=None if learned is None else learned[...],
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class EvoNormS0(_NormActivation):
    """EvoNorm-S0 (`bnjax.evonorm_s0`): ``x * sigmoid(v * x) / group_std(x) * scale + bias``.

    Args:
      num_features: channels C.
      num_groups, group_size: exactly one, dividing C (the paper's 32 groups).
      epsilon: added to the group variance (1e-5).
      v_init: initializer of the per-channel ``v`` (ones).
      activation, axis and the rest: as `FilterResponseNorm`.

    Example:
      >>> layer = EvoNormS0(8, num_groups=4, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 3, 3, 8))).shape
      (2, 3, 3, 8)
    """

    num_groups: int | None = 32
    """Number of groups G; give it or `group_size`."""
    group_size: int | None = None
    """Channels per group instead of `num_groups`."""
    epsilon: float = 1e-5
    """Added to the group variance."""
    v_init: dataclasses.InitVar[Initializer] = initializers.ones
    """Initializer of ``v``."""

    def _create_extra(self, rngs, v_init):
        self.v = self._activation_param(rngs, v_init)

    def __call__(self, x, *, mask=None):
        """Normalizes x (N, ..., C); `mask`: booleans broadcastable to x."""
        x, scale, bias, out_dtype = self._inputs(x)
        y = evonorm_s0(
            x,
            scale,
            bias,
            None if self.v is None else self.v[...],
            num_groups=self.num_groups,
            group_size=self.group_size,
            epsilon=self.epsilon,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        return y.astype(out_dtype)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class EvoNormB0(_NormActivation):
    """EvoNorm-B0 (`bnjax.evonorm_b0`), with BatchNorm's mode switching and running variance.

    ``y = x / max(sqrt(batch_var + eps), v * x + sqrt(instance_var + eps)) * scale + bias``,
    the batch variance in training (updating ``var``), the running ``var`` in evaluation.
    State: ``nnx.BatchStat`` ``var`` (C,) float32 (and int32 ``count``, ``skipped`` with
    ``track_counters=True``); ``model.train()`` / ``model.eval()`` switch the mode.

    Args:
      num_features: channels C.
      use_running_average, momentum, epsilon (1e-5), track_counters: as BatchNorm's.
      v_init: initializer of ``v`` (ones).
      activation, axis and the rest: as `FilterResponseNorm`; axis_name, axis_index_groups
        share the batch variance across devices (exact merge).

    Example:
      >>> layer = EvoNormB0(3, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (8, 2, 2, 3)))   # training
      >>> bool(jnp.any(layer.var[...] != 1.0))
      True
    """

    use_running_average: bool | None = False
    """True evaluates with the running variance (``model.eval()``)."""
    momentum: float | None = 0.99
    """Decay of the running variance; None: cumulative average (needs `track_counters`)."""
    epsilon: float = 1e-5
    """Added to both variances."""
    track_counters: bool = False
    """Keep int32 ``count`` and ``skipped`` as ``nnx.BatchStat``."""
    v_init: dataclasses.InitVar[Initializer] = initializers.ones
    """Initializer of ``v``."""

    _training = _RunningStats._training
    _counter_values = _RunningStats._counter_values
    _store_counters = _RunningStats._store_counters
    set_view = _RunningStats.set_view

    def _create_extra(self, rngs, v_init):
        if self.momentum is None and not self.track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: pass track_counters=True to keep that count."
            )
        self.v = self._activation_param(rngs, v_init)
        self.var = nnx.BatchStat(jnp.ones(_shape(self.num_features), jnp.float32))
        if self.track_counters:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
            self.skipped = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x`; `use_running_average` overrides the attribute for this call."""
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        state = EvoNormB0State(self.var[...], *self._counter_values())
        y, new = evonorm_b0(
            x,
            state,
            scale,
            bias,
            None if self.v is None else self.v[...],
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        if training:
            self.var[...] = new.var
            self._store_counters(new)
        return y.astype(out_dtype)
