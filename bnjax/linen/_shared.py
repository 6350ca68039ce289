"""Plumbing the flax.linen modules share: flax's 'scale'/'bias' params, BatchNorm's options and
mode, the counters, the per-example modules' dtype and device options."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from bnjax.core.checks import normalize_axes
from bnjax.module_common import check_use_running_average, promote

_COUNTER_NAMES = ("count", "skipped")


def _feature_shape(x, axes, name: str) -> tuple[int, ...]:
    return tuple(x.shape[a] for a in normalize_axes(axes, x.ndim, name))


def _values_per_statistic(shape, feature_axes, ghost_batch_size) -> int:
    values = math.prod(s for a, s in enumerate(shape) if a not in feature_axes)
    return values // shape[0] * ghost_batch_size if ghost_batch_size else values


class _AffineMixin:
    """'scale' and 'bias' params as flax creates them (None when switched off)."""

    def _scale_and_bias(self, shape: tuple[int, ...]):
        def make(name, used):
            init = getattr(self, f"{name}_init")
            return self.param(name, init, shape, self.param_dtype) if used else None

        return make("scale", self.use_scale), make("bias", self.use_bias)


class _RunningStats(_AffineMixin, nn.Module):
    """BatchNorm's fields (flax's, in flax's order, then bnjax's) and the plumbing it shares
    with BatchRenorm: mode, counters, call options."""

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
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
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    ghost_batch_size: int | None = None
    use_unbiased_running_var: bool = False
    track_counters: bool = False

    def _training(self, use_running_average) -> bool:
        return not nn.merge_param(
            "use_running_average",
            check_use_running_average(self.use_running_average),
            check_use_running_average(use_running_average),
        )

    def _counters(self, training: bool):
        """(count, skipped) variables in 'batch_stats' (None untracked), and their values."""
        if self.momentum is None and training and not self.track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: set track_counters=True to keep that count in 'batch_stats'."
            )
        if not self.track_counters:
            return None, (jnp.zeros((), jnp.int32),) * 2
        counters = [
            self.variable("batch_stats", n, jnp.zeros, (), jnp.int32) for n in _COUNTER_NAMES
        ]
        return counters, tuple(c.value for c in counters)

    def _core_options(self, x, training: bool) -> tuple[bool, dict]:
        """(effective training flag, keyword options for the core call)."""
        initializing = self.is_initializing()
        feature_axes = normalize_axes(self.axis, x.ndim, "axis")
        if initializing and _values_per_statistic(x.shape, feature_axes, self.ghost_batch_size) < 2:
            # The usual `init(key, jnp.ones((1, D)))`: only shapes matter, and batch statistics
            # of one value are undefined, so init runs on the fresh running statistics.
            training = False
        return training, dict(
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            # Like flax: init runs outside pmap/shard_map, where axis_name is not bound.
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            ghost_batch_size=self.ghost_batch_size if training else None,
            use_unbiased_running_var=self.use_unbiased_running_var,
        )

    def _store_counters(self, counters, new_state) -> None:
        if counters is not None:
            for counter, name in zip(counters, _COUNTER_NAMES, strict=True):
                counter.value = getattr(new_state, name)


class _PerExample(_AffineMixin, nn.Module):
    """Plumbing shared by the stateless modules: flax's dtype rule and the device options."""

    def _prepare(self, x, feature_shape):
        """(x for the core, scale, bias, output dtype)."""
        scale, bias = self._scale_and_bias(feature_shape)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        return x, scale, bias, out_dtype

    def _device_options(self) -> dict:
        # Like BatchNorm: init runs outside pmap/shard_map, where axis_name is not bound, and
        # only needs shapes.
        initializing = self.is_initializing()
        return dict(
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
        )
