"""flax.nnx modules over the bnjax core: swap ``nnx.BatchNorm`` for ``bnjax.nnx.BatchNorm``.

Each module creates its parameters and state, then calls one core function (the math lives
there: `bnjax.batch_norm`, `bnjax.batch_renorm`, `bnjax.group_norm`, `bnjax.layer_norm`,
`bnjax.instance_norm`, `bnjax.rms_norm`). Constructors keep flax's arguments, defaults and rng
use (one ``rngs.params()`` key per created scale/bias, as flax, so the layers around keep their
init), and the state has exactly flax's variables:

- ``nnx.Param`` ``scale``, ``bias``; ``nnx.BatchStat`` ``mean``, ``var`` (float32).

``track_counters=True`` adds two int32 ``nnx.BatchStat`` scalars, ``count`` (batches folded into
the running statistics) and ``skipped`` (non-finite training batches left out), so the usual
``nnx.split(model, nnx.Param, nnx.BatchStat)`` still covers the whole state.
``momentum=None`` (a cumulative average) needs them.

``model.train()`` / ``model.eval()`` (and ``nnx.view(model, use_running_average=...)``) switch
`use_running_average` exactly as for flax's BatchNorm; the call argument takes precedence.
`promote_dtype` is applied as in flax to the input and the parameters; the statistics stay
float32 (flax's default also casts the running statistics to `dtype`). Other differences from
flax are those of `bnjax.linen` (exact two-pass float32 statistics whatever
`use_fast_variance`, exact cross-device merges, non-finite batches skipped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    RenormSchedule,
    batch_norm,
    batch_renorm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from bnjax.core.checks import as_int, normalize_axes
from bnjax.module_common import check_instance_feature_axes, check_use_running_average, promote

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    return (num_features,) if isinstance(num_features, int) else tuple(num_features)


class _Affine(nnx.Module):
    """Creates 'scale' and 'bias' the way flax does; runs the shared call-time plumbing."""

    def _init_affine(
        self,
        shape,
        *,
        use_scale,
        use_bias,
        scale_init,
        bias_init,
        param_dtype,
        rngs,
        scale_metadata,
        bias_metadata,
    ):
        self.scale = (
            nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
            if use_scale
            else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
            if use_bias
            else nnx.data(None)
        )

    def _inputs(self, x):
        """(x for the core, scale, bias, output dtype): `promote_dtype` as in flax, then
        flax's output dtype rule (`dtype`, else the promoted x and parameters)."""
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        return x, scale, bias, out_dtype


class _RunningStats(_Affine):
    """BatchNorm's state and options (flax's, then bnjax's) and mode switching, shared with
    BatchRenorm."""

    def _init_running(
        self,
        num_features,
        *,
        use_running_average,
        axis,
        momentum,
        epsilon,
        dtype,
        param_dtype,
        use_bias,
        use_scale,
        bias_init,
        scale_init,
        axis_name,
        axis_index_groups,
        use_fast_variance,
        promote_dtype,
        rngs,
        bias_metadata,
        scale_metadata,
        ghost_batch_size,
        use_unbiased_running_var,
        track_counters,
    ):
        if momentum is None and not track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: pass track_counters=True to keep that count."
            )
        shape = _shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        if track_counters:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
            self.skipped = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self._init_affine(
            shape,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.dtype, self.param_dtype = dtype, param_dtype
        self.use_bias, self.use_scale = use_bias, use_scale
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.ghost_batch_size = ghost_batch_size
        self.use_unbiased_running_var = use_unbiased_running_var
        self.track_counters = track_counters

    def _training(self, use_running_average) -> bool:
        use_running_average = check_use_running_average(use_running_average)
        if use_running_average is None:
            use_running_average = check_use_running_average(self.use_running_average)
        if use_running_average is None:
            raise ValueError(
                f"{type(self).__name__} needs `use_running_average`: set it in the constructor, "
                f"call model.train() / model.eval(), or pass it to the call."
            )
        return not use_running_average

    def _counter_values(self):
        if not self.track_counters:
            return (jnp.zeros((), jnp.int32),) * 2
        return self.count[...], self.skipped[...]

    def _store_counters(self, new) -> None:
        if self.track_counters:
            self.count[...], self.skipped[...] = new.count, new.skipped

    def _options(self, training: bool) -> dict:
        return dict(
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            ghost_batch_size=self.ghost_batch_size if training else None,
            use_unbiased_running_var=self.use_unbiased_running_var,
        )

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: True evaluates with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_RunningStats):
    """Batch normalization (`bnjax.batch_norm`), a drop-in for ``flax.nnx.BatchNorm``.

    Args:
      num_features: channels C (or the feature shape, for several feature axes).
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups, promote_dtype, rngs,
        bias_metadata, scale_metadata: as in flax. `momentum=None` keeps a cumulative average.
      use_fast_variance: accepted; statistics are always exact two-pass float32.
      ghost_batch_size, use_unbiased_running_var: see `bnjax.batch_norm`.
      track_counters: keep int32 ``count`` and ``skipped`` as ``nnx.BatchStat``.

    Shapes: x (N, ..., C) with axis=-1; scale, bias, mean, var (C,).

    Example:
      >>> bn = BatchNorm(3, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))  # training: updates mean and var
      >>> (bn.mean[...] * 1000).round().tolist()
      [45.0, 55.0, 65.0]
      >>> sorted(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat)))   # exactly flax's
      ['mean', 'var']
      >>> bn.eval()  # now evaluates with the running statistics
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        ghost_batch_size: int | None = None,
        use_unbiased_running_var: bool = False,
        track_counters: bool = False,
    ):
        self._init_running(
            num_features,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
            ghost_batch_size=ghost_batch_size,
            use_unbiased_running_var=use_unbiased_running_var,
            track_counters=track_counters,
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x`; `use_running_average` overrides the attribute for this call.

        `mask`: booleans broadcastable to x, as in flax (per example: ``mask[:, None]`` for x
        of shape (N, C)); False entries stay out of the statistics (still normalized).
        """
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        state = BatchNormState(self.mean[...], self.var[...], *self._counter_values())
        y, new = batch_norm(x, state, scale, bias, mask=mask, **self._options(training))
        if training:
            self.mean[...], self.var[...] = new.mean, new.var
            self._store_counters(new)
        return y.astype(out_dtype)


class BatchRenorm(_RunningStats):
    """Batch renormalization (`bnjax.batch_renorm`), with BatchNorm's arguments.

    State: ``nnx.BatchStat`` mean, var (evaluation), renorm_mean, renorm_var (what r and d are
    measured against) and the int32 step that drives `schedule` (and count, skipped with
    ``track_counters=True``).

    Args:
      (all of BatchNorm's, with the same meanings), and
      renorm_momentum: decay of renorm_mean/renorm_var.
      r_max, d_max: fixed clipping bounds (both or neither); None follows `schedule`.
      schedule: a `bnjax.RenormSchedule` (default: the paper's, plain BN until step 5k).

    Example:
      >>> layer = BatchRenorm(3, r_max=3.0, d_max=5.0, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.arange(12.0).reshape(4, 3))
      >>> int(layer.step[...])
      1
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        ghost_batch_size: int | None = None,
        use_unbiased_running_var: bool = False,
        track_counters: bool = False,
        renorm_momentum: float = 0.99,
        r_max: float | None = None,
        d_max: float | None = None,
        schedule: RenormSchedule | None = None,
    ):
        self._init_running(
            num_features,
            use_running_average=use_running_average,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
            ghost_batch_size=ghost_batch_size,
            use_unbiased_running_var=use_unbiased_running_var,
            track_counters=track_counters,
        )
        shape = _shape(num_features)
        self.renorm_mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.renorm_var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.renorm_momentum, self.r_max, self.d_max = renorm_momentum, r_max, d_max
        self.schedule = schedule

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        count, skipped = self._counter_values()
        state = BatchRenormState(
            self.mean[...],
            self.var[...],
            self.renorm_mean[...],
            self.renorm_var[...],
            count,
            skipped,
            self.step[...],
        )
        y, new = batch_renorm(
            x,
            state,
            scale,
            bias,
            mask=mask,
            renorm_momentum=self.renorm_momentum,
            r_max=self.r_max,
            d_max=self.d_max,
            schedule=self.schedule,
            **self._options(training),
        )
        if training:
            self.mean[...], self.var[...] = new.mean, new.var
            self.renorm_mean[...], self.renorm_var[...] = new.renorm_mean, new.renorm_var
            self.step[...] = new.step
            self._store_counters(new)
        return y.astype(out_dtype)


class _PerExample(_Affine):
    """Options shared by GroupNorm, LayerNorm, InstanceNorm and RMSNorm (flax's common ones)."""

    def _init_common(
        self,
        num_features,
        *,
        epsilon,
        dtype,
        param_dtype,
        use_bias,
        use_scale,
        bias_init,
        scale_init,
        axis_name,
        axis_index_groups,
        use_fast_variance,
        promote_dtype,
        rngs,
        bias_metadata,
        scale_metadata,
    ):
        self._init_affine(
            _shape(num_features),
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=scale_metadata,
            bias_metadata=bias_metadata,
        )
        self.num_features = num_features
        self.epsilon, self.dtype, self.param_dtype = epsilon, dtype, param_dtype
        self.use_bias, self.use_scale = use_bias, use_scale
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def _device_options(self) -> dict:
        return dict(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)

    def _feature_shaped(self, x, scale, bias, feature_axes):
        """scale and bias in the shape of x along `feature_axes`. flax's constructor takes
        one int `num_features` (the product, for several feature axes) and reshapes the flat
        parameters at call time; bnjax takes that and a tuple alike."""
        axes = normalize_axes(feature_axes, jnp.ndim(x), "feature_axes")
        shape = tuple(jnp.shape(x)[a] for a in axes)

        def reshape(param):
            if param is None or param.shape == shape or param.size != math.prod(shape):
                return param  # a mismatch is reported by the core, naming the argument
            return param.reshape(shape)

        return reshape(scale), reshape(bias)


class GroupNorm(_PerExample):
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

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                f"Give exactly one of `num_groups` and `group_size` (got num_groups="
                f"{num_groups}, group_size={group_size}); pass num_groups=None with group_size."
            )
        divisor = num_groups if group_size is None else group_size
        divisor = as_int(divisor, "num_groups" if group_size is None else "group_size")
        if divisor < 1 or num_features % divisor:
            raise ValueError(
                f"`num_groups`/`group_size`={divisor} must divide num_features={num_features}."
            )
        self._init_common(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.num_groups = divisor if group_size is None else num_features // divisor
        self.group_size = num_features // self.num_groups
        self.reduction_axes = reduction_axes

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


class LayerNorm(_PerExample):
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

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._init_common(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.reduction_axes, self.feature_axes = reduction_axes, feature_axes

    def __call__(self, x, *, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x, scale, bias, out_dtype = self._inputs(x)
        scale, bias = self._feature_shaped(x, scale, bias, self.feature_axes)
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

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._init_common(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=False,
            use_scale=use_scale,
            bias_init=None,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=_NO_METADATA,
            scale_metadata=scale_metadata,
        )
        self.reduction_axes, self.feature_axes = reduction_axes, feature_axes

    def __call__(self, x, mask=None):
        """Normalizes `x`; `mask`: booleans broadcastable to x."""
        x, scale, _, out_dtype = self._inputs(x)
        scale, _ = self._feature_shaped(x, scale, None, self.feature_axes)
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

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._init_common(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.feature_axes = feature_axes

    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask`: booleans broadcastable to x."""
        x = jnp.asarray(x)
        check_instance_feature_axes(self.feature_axes, x.ndim)
        x, scale, bias, out_dtype = self._inputs(x)
        scale, bias = self._feature_shaped(x, scale, bias, self.feature_axes)
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
