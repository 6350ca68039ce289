"""flax.linen modules over the bnjax core: swap ``flax.linen.BatchNorm`` for ``BatchNorm``.

Each module creates its parameters and state, then calls one core function (the math lives
there: `bnjax.batch_norm`, `bnjax.batch_renorm`, `bnjax.group_norm`, `bnjax.layer_norm`,
`bnjax.instance_norm`, `bnjax.rms_norm`). Options keep flax's names, defaults and meanings, and
the variables are exactly flax's (collections, names, shapes, dtypes), so flax checkpoints and
flax training code work unchanged:

- ``'params'``: ``'scale'`` and ``'bias'`` (feature shape, `param_dtype`).
- ``'batch_stats'``: ``'mean'`` and ``'var'`` (feature shape, float32).

Train with ``mutable=['batch_stats']``, as with flax. ``track_counters=True`` adds two int32
scalars to ``'batch_stats'``: ``'count'`` (batches folded into the running statistics) and
``'skipped'`` (training batches whose statistics were not finite and were left out); the same
``mutable=['batch_stats']`` keeps them. ``momentum=None`` (a cumulative average over all
batches) needs them.

What differs from flax, on purpose (each for correctness):

- Statistics are float32 (float64 for float64 input) and two-pass, exact where flax's default
  one-pass ``E[x^2] - E[x]^2`` loses digits: `use_fast_variance` and
  `force_float32_reductions` are accepted and have no effect on them.
- With `axis_name`, statistics merge (count, mean, m2) exactly across devices, also when
  devices hold different numbers of valid values; flax averages per-device means.
- A training batch with non-finite statistics leaves ``batch_stats`` untouched (flax stores
  NaN); `bnjax.diagnostics` reports it, and ``track_counters=True`` counts it.
- A statistic with no valid value (everything masked) uses mean 0 and variance 0; flax gives NaN.
  A channel with fewer than two valid values keeps its running statistics (flax folds in the
  variance 0 of a single value).
- `use_running_average` must be True, False or None (flax reads any value as a bool, so the
  string 'False' would evaluate).
- BatchNorm statistics from a single value (a batch of one in training, outside ``init``)
  raise an error instead of silently returning the bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    RenormSchedule,
    batch_norm,
    batch_renorm,
    evonorm_b0,
    evonorm_s0,
    filter_response_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from bnjax.core.checks import as_int, normalize_axes
from bnjax.core.cross_iteration_batch_norm import (
    CrossIterationState,
    convolution,
    cross_iteration_batch_norm,
    cross_iteration_state,
)
from bnjax.core.domain_batch_norm import (
    DomainBatchNormState,
    domain_batch_norm,
    domain_moments,
)
from bnjax.core.evonorm import EvoNormB0State
from bnjax.core.moving_average_batch_norm import (
    MovingAverageBatchNormState,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
)
from bnjax.module_common import check_instance_feature_axes, check_use_running_average, promote

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "DomainBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
]

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


class BatchNorm(_RunningStats):
    """Batch normalization (`bnjax.batch_norm`), a drop-in for ``flax.linen.BatchNorm``.

    ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` with the batch's statistics in
    training (``use_running_average=False``; updates ``batch_stats`` unless initializing) and
    the running ones in evaluation. Running update:
    ``running = momentum * running + (1 - momentum) * batch`` (biased variance by default).

    Attributes:
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
      bias_init, scale_init, axis_name, axis_index_groups: as in flax. `momentum=None` keeps a
        cumulative average (needs ``track_counters=True``).
        `dtype` is the output dtype (None: promote x and params); statistics are float32.
      use_fast_variance, force_float32_reductions: accepted; statistics are always exact
        two-pass float32 (see the module docstring).
      ghost_batch_size: statistics per group of this many examples (see `bnjax.batch_norm`).
      use_unbiased_running_var: store the unbiased variance, like PyTorch.
      track_counters: keep int32 'count' and 'skipped' in 'batch_stats' (see the module
        docstring); needed by `momentum=None`.

    Shapes: x (N, ..., C) with axis=-1; params and batch_stats (C,) (the feature shape).

    Example:
      >>> bn = BatchNorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = bn.init(jax.random.key(1), x)
      >>> jax.tree.map(jnp.shape, variables["batch_stats"])
      {'mean': (3,), 'var': (3,)}
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates), y.shape
      (['batch_stats'], (8, 3))
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x`; `use_running_average` here or as a field (exactly one of them).

        `mask`: booleans broadcastable to x, as in flax (per example: ``mask[:, None]`` for
        x of shape (N, C)); False entries stay out of the statistics (they are still
        normalized).
        """
        training = self._training(use_running_average)
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.axis, "axis")
        mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
        counters, (count, skipped) = self._counters(training)
        scale, bias = self._scale_and_bias(feature_shape)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        training, options = self._core_options(x, training)
        state = BatchNormState(mean.value, var.value, count, skipped)
        y, new_state = batch_norm(x, state, scale, bias, mask=mask, **options)
        if training and not self.is_initializing():
            mean.value, var.value = new_state.mean, new_state.var
            self._store_counters(counters, new_state)
        return y.astype(out_dtype)


class BatchRenorm(_RunningStats):
    """Batch renormalization (`bnjax.batch_renorm`, Ioffe 2017), with BatchNorm's options.

    Training normalizes with the batch statistics corrected toward running ones,
    ``y = scale * (x_hat * r + d) + bias``; evaluation is BatchNorm's, on 'mean' and 'var'.

    'batch_stats' holds 'mean', 'var' (evaluation), 'renorm_mean', 'renorm_var' (what r and d
    are measured against) and the int32 'step' that drives the warm-up `schedule`, so the
    usual ``mutable=['batch_stats']`` advances the schedule (and the counters, with
    ``track_counters=True``, as for BatchNorm).

    Attributes:
      (all of BatchNorm's, with the same meanings), then:
      renorm_momentum: decay of 'renorm_mean'/'renorm_var'.
      r_max, d_max: fixed clipping bounds (both or neither); None follows `schedule`.
      schedule: a `bnjax.RenormSchedule` (default: the paper's, plain BN until step 5k).

    Example:
      >>> layer = BatchRenorm(use_running_average=False, r_max=3.0, d_max=5.0)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> sorted(variables["batch_stats"])
      ['mean', 'renorm_mean', 'renorm_var', 'step', 'var']
      >>> _, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> int(updates["batch_stats"]["step"])
      1
    """

    renorm_momentum: float = 0.99
    r_max: float | None = None
    d_max: float | None = None
    schedule: RenormSchedule | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        training = self._training(use_running_average)
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.axis, "axis")

        def stat(name, init, shape=feature_shape, dtype=jnp.float32):
            return self.variable("batch_stats", name, init, shape, dtype)

        mean, var = stat("mean", jnp.zeros), stat("var", jnp.ones)
        renorm_mean, renorm_var = stat("renorm_mean", jnp.zeros), stat("renorm_var", jnp.ones)
        step = stat("step", jnp.zeros, (), jnp.int32)
        counters, (count, skipped) = self._counters(training)
        scale, bias = self._scale_and_bias(feature_shape)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        training, options = self._core_options(x, training)
        state = BatchRenormState(
            mean.value,
            var.value,
            renorm_mean.value,
            renorm_var.value,
            count,
            skipped,
            step.value,
        )
        y, new_state = batch_renorm(
            x,
            state,
            scale,
            bias,
            mask=mask,
            renorm_momentum=self.renorm_momentum,
            r_max=self.r_max,
            d_max=self.d_max,
            schedule=self.schedule,
            **options,
        )
        if training and not self.is_initializing():
            mean.value, var.value = new_state.mean, new_state.var
            renorm_mean.value, renorm_var.value = new_state.renorm_mean, new_state.renorm_var
            step.value = new_state.step
            self._store_counters(counters, new_state)
        return y.astype(out_dtype)


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


# Convolutions with a weight-standardized or centered kernel (drop-ins for flax's nn.Conv).
from bnjax.linen_standardized_conv import CenteredConv, StandardizedConv  # noqa: E402

__all__ += ["CenteredConv", "StandardizedConv"]
# ------------------------------------------------------------ moving average batch norm

PROBE_COLLECTION = "backward_probe"
"""The linen collection of `MovingAverageBatchNorm`'s zero 'probe' inputs, whose gradient is
each layer's backward batch statistics (see `backward_probes`)."""

_MOVING_AVERAGE_HISTORIES = (
    "mean_history",
    "var_history",
    "grad_mean_history",
    "grad_scaled_history",
)
_MOVING_AVERAGE_COUNTERS = ("count", "backward_count", "skipped")


class MovingAverageBatchNorm(_AffineMixin, nn.Module):
    """Moving average batch normalization (`bnjax.moving_average_batch_norm`, MABN).

    Training normalizes with simple moving averages of the batch statistics over the last
    `window` steps, in the forward (the second moment; mean and variance with `centered`) and
    in the backward (psi, and g with `centered`), renormalized towards the exponential
    averages 'mean' and 'var' that evaluation uses, as batch norm does (so the lifecycle tools
    fold it like one). Pair it with zero-mean weights in the layer before.

    Variables: 'params' 'scale', 'bias' (C,); 'batch_stats' 'mean', 'var' (C,), the four
    histories (window - 1, C), int32 'count', 'backward_count', 'skipped'; and, from
    ``init``, ``'backward_probe'`` 'probe' (2, C) zeros. Train with
    ``mutable=['batch_stats']`` and differentiate the loss with respect to the
    'backward_probe' variables too; then ``apply_backward_statistics(batch_stats, probe_grads)``
    stores this step's backward statistics (`bnjax.train`'s train step does both). Without
    the probe the layer still trains with MABN's gradient, averaging only the current step's
    backward statistics.

    Attributes:
      use_running_average, axis, momentum (default 0.98), epsilon, dtype, param_dtype,
      use_bias, use_scale, bias_init, scale_init, axis_name, axis_index_groups: as in
        BatchNorm.
      window: steps m of the simple moving averages (1: the current batch only).
      centered: keep the mean statistics (otherwise the second moment only, the paper's
        reduced form).
      r_max, d_max, renorm_warmup_steps: renormalization bounds and warm-up (see the core).

    Example:
      >>> layer = MovingAverageBatchNorm(use_running_average=False, window=4)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> sorted(variables), variables["batch_stats"]["var_history"].shape
      (['backward_probe', 'batch_stats', 'params'], (3, 3))
      >>> def loss(params, probes):
      ...     y, updates = layer.apply({**variables, "params": params, "backward_probe": probes},
      ...                              x, mutable=["batch_stats"])
      ...     return jnp.sum(y * x), updates["batch_stats"]
      >>> (grads, probe_grads), stats = jax.grad(loss, (0, 1), has_aux=True)(
      ...     variables["params"], variables["backward_probe"])
      >>> stats = apply_backward_statistics(stats, probe_grads)
      >>> int(stats["count"]), int(stats["backward_count"])
      (1, 1)
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.98
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    window: int = 16
    centered: bool = False
    r_max: float = 5.0
    d_max: float = 5.0
    renorm_warmup_steps: int = 1000

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        training = not nn.merge_param(
            "use_running_average",
            check_use_running_average(self.use_running_average),
            check_use_running_average(use_running_average),
        )
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.axis, "axis")
        fresh = moving_average_batch_norm_state(feature_shape, window=self.window)
        fields = {
            name: self.variable("batch_stats", name, lambda v=value: v)
            for name, value in fresh._asdict().items()
        }
        state = MovingAverageBatchNormState(**{n: v.value for n, v in fields.items()})
        probe = None
        if self.is_initializing() or self.has_variable(PROBE_COLLECTION, "probe"):
            probe = self.variable(
                PROBE_COLLECTION, "probe", moving_average_batch_norm_probe, fresh
            ).value
        scale, bias = self._scale_and_bias(feature_shape)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        initializing = self.is_initializing()
        y, new_state = moving_average_batch_norm(
            x,
            state,
            scale,
            bias,
            probe,
            training=training and not initializing,
            momentum=self.momentum,
            epsilon=self.epsilon,
            centered=self.centered,
            r_max=self.r_max,
            d_max=self.d_max,
            renorm_warmup_steps=self.renorm_warmup_steps,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
        if training and not initializing:
            for name, variable in fields.items():
                variable.value = getattr(new_state, name)
        return y.astype(out_dtype)


def _is_moving_average_stats(node) -> bool:
    return isinstance(node, Mapping) and all(
        name in node for name in (*_MOVING_AVERAGE_HISTORIES, "var", "backward_count")
    )


def backward_probes(batch_stats) -> dict:
    """Zero probes for every `MovingAverageBatchNorm` in a 'batch_stats' tree, nested as
    the layers are ({} when there is none): the ``'backward_probe'`` collection to apply the
    model with, and to differentiate with respect to.

    Example:
      >>> backward_probes({"conv": {}, "norm": {"mean": jnp.zeros(2), "var": jnp.ones(2)}})
      {}
    """

    def walk(node):
        if _is_moving_average_stats(node):
            return {"probe": jnp.zeros((2, *jnp.shape(node["var"])), jnp.result_type(node["var"]))}
        found = {}
        if isinstance(node, Mapping):
            for key, value in node.items():
                probes = walk(value)
                if probes:
                    found[key] = probes
        return found

    return walk(batch_stats)


def apply_backward_statistics(batch_stats, probe_grads) -> dict:
    """'batch_stats' with each moving-average layer's backward statistics (its probe's
    gradient, from `backward_probes`' tree) folded in
    (`bnjax.moving_average_batch_norm_backward_update`); other layers unchanged.

    Example:
      >>> layer = MovingAverageBatchNorm(use_running_average=False, window=2)
      >>> stats = layer.init(jax.random.key(0), jnp.ones((4, 3)))["batch_stats"]
      >>> grads = jax.tree.map(jnp.ones_like, backward_probes(stats))
      >>> apply_backward_statistics(stats, grads)["grad_scaled_history"].tolist()
      [[1.0, 1.0, 1.0]]
    """

    def walk(node, grads):
        if _is_moving_average_stats(node):
            state = MovingAverageBatchNormState(
                **{name: node[name] for name in MovingAverageBatchNormState._fields}
            )
            updated = moving_average_batch_norm_backward_update(state, grads["probe"])
            return {**node, **updated._asdict()}
        if isinstance(node, Mapping):
            return {
                key: walk(value, grads[key]) if key in grads else value
                for key, value in node.items()
            }
        return node

    return walk(batch_stats, probe_grads)


__all__ += [
    "PROBE_COLLECTION",
    "MovingAverageBatchNorm",
    "apply_backward_statistics",
    "backward_probes",
]


class DomainBatchNorm(_RunningStats):
    """Domain-specific batch normalization (`bnjax.domain_batch_norm`): running statistics,
    and by default scale and bias, per domain, chosen per example by an integer index.

    ``y_n = scale_d * (x_n - mean_d) / sqrt(var_d + epsilon) + bias_d`` with d the domain of
    example n: in training each domain's statistics come from its own examples of the batch,
    in evaluation from its running statistics. A split / auxiliary BN (AdvProp: domain 0
    clean, 1 adversarial), DSBN (a domain per source and target) or FedBN / SiloBN (a domain
    per client) in one layer.

    Attributes:
      num_domains: D, the number of domains.
      per_domain_affine: one 'scale' and 'bias' per domain, (D, C), as DSBN, AdvProp's
        auxiliary BN and FedBN; False shares one (C,) pair (SiloBN).
      default_domain: the domain of every example when the call passes no `domain` (0:
        AdvProp's main BN, which is also the one used at test time); None makes `domain`
        required.
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups, ghost_batch_size,
        use_unbiased_running_var, use_fast_variance, force_float32_reductions: as `BatchNorm`.
      track_counters: keep int32 (D,) 'count' and 'skipped' in 'batch_stats', one per
        domain; needed by `momentum=None`.

    Shapes: x (N, ..., C) with axis=-1, domain (N,); 'batch_stats' mean and var (D, C);
    'params' scale and bias (D, C), or (C,) when shared.

    Example:
      >>> bn = DomainBatchNorm(num_domains=2, use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> domain = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])      # clean, then adversarial
      >>> variables = bn.init(jax.random.key(1), x, domain=domain)
      >>> jax.tree.map(jnp.shape, variables["batch_stats"])
      {'mean': (2, 3), 'var': (2, 3)}
      >>> y, updates = bn.apply(variables, x, domain=domain, mutable=["batch_stats"])
      >>> y.shape, updates["batch_stats"]["mean"].shape
      ((8, 3), (2, 3))
    """

    num_domains: int = 2
    per_domain_affine: bool = True
    default_domain: int | None = 0

    def _domain(self, x, domain):
        if domain is None:
            if self.default_domain is None:
                raise TypeError(
                    f"{type(self).__name__} has default_domain=None, so the call needs "
                    f"`domain`: an int array of shape ({x.shape[0]},) of domain indices."
                )
            return jnp.full((x.shape[0],), self.default_domain, jnp.int32)
        return domain

    def input_moments(self, x, use_running_average=None, *, domain=None, mask=None):
        """Per-domain moments (D, *features) of a call's input, as `__call__` would route it
        (what `bnjax.lifecycle.recalibrate` accumulates)."""
        del use_running_average  # the same routing in both modes
        x = jnp.asarray(x)
        return domain_moments(
            x,
            self._domain(x, domain),
            as_int(self.num_domains, "num_domains"),
            axis=self.axis,
            mask=mask,
        )

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, domain=None, mask=None):
        """Normalizes `x` by each example's domain (`domain`: int (N,) or one int; None:
        `default_domain`). `mask` as in `BatchNorm`."""
        training = self._training(use_running_average)
        x = jnp.asarray(x)
        num_domains = as_int(self.num_domains, "num_domains")
        stacked = (num_domains, *_feature_shape(x, self.axis, "axis"))
        mean = self.variable("batch_stats", "mean", jnp.zeros, stacked, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, stacked, jnp.float32)
        if self.momentum is None and training and not self.track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: set track_counters=True to keep that count in 'batch_stats'."
            )
        counters = None
        values = (jnp.zeros((num_domains,), jnp.int32),) * 2
        if self.track_counters:
            counters = [
                self.variable("batch_stats", n, jnp.zeros, (num_domains,), jnp.int32)
                for n in _COUNTER_NAMES
            ]
            values = tuple(c.value for c in counters)
        scale, bias = self._scale_and_bias(stacked if self.per_domain_affine else stacked[1:])
        x, out_dtype = promote(x, scale, bias, self.dtype)
        training, options = self._core_options(x, training)
        state = DomainBatchNormState(mean.value, var.value, *values)
        y, new_state = domain_batch_norm(
            x, state, scale, bias, domain=self._domain(x, domain), mask=mask, **options
        )
        if training and not self.is_initializing():
            mean.value, var.value = new_state.mean, new_state.var
            self._store_counters(counters, new_state)
        return y.astype(out_dtype)


# ------------------------------------------------------------ normalization-activation layers


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


__all__ += ["EvoNormB0", "EvoNormS0", "FilterResponseNorm"]


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


__all__ += ["CrossIterationConvBatchNorm"]
