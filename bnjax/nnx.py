"""flax.nnx modules over the bnjax core: swap ``nnx.BatchNorm`` for ``bnjax.nnx.BatchNorm``.

Each module creates its parameters and state, then calls one core function (the math lives
there: `bnjax.batch_norm`, `bnjax.batch_renorm`, `bnjax.group_norm`, `bnjax.layer_norm`,
`bnjax.instance_norm`). Constructors keep flax's arguments, defaults and rng use (one
``rngs.params()`` key per created scale/bias, as flax, so the layers around keep their init):

- ``nnx.Param`` ``scale``, ``bias``; ``nnx.BatchStat`` ``mean``, ``var``: flax's names, so
  ``nnx.state(model, nnx.BatchStat)`` and ``nnx.state(model, nnx.Param)`` are flax's.
- `BatchCounter` ``count`` and ``skipped`` (bnjax only; int32): batches folded into the
  running statistics and non-finite batches left out. A separate variable type, so filters
  on ``nnx.BatchStat`` see exactly flax's state. Restore a flax checkpoint into the other
  variables with ``nnx.update(model, flax_state)``.

``model.train()`` / ``model.eval()`` (and ``nnx.view(model, use_running_average=...)``) switch
`use_running_average` exactly as for flax's BatchNorm; the call argument takes precedence.
Differences from flax are those of `bnjax.linen` (always two-pass float32 statistics, so
`use_fast_variance` is ignored; non-finite batches are skipped; a custom `promote_dtype` is
not supported: `dtype` sets the output dtype, None promotes x and the parameters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Axes, Dtype, Initializer

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    RenormSchedule,
    batch_norm,
    batch_renorm,
    layer_norm,
)
from bnjax.core.checks import as_int
from bnjax.module_common import group_norm_flax_axes, instance_norm_flax_axes, promote, refuse

__all__ = ["BatchCounter", "BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm"]

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class BatchCounter(nnx.Variable):
    """int32 counters of a batch-norm layer ('count', 'skipped'); not an ``nnx.BatchStat``.

    Example:
      >>> bn = BatchNorm(3, rngs=nnx.Rngs(0))
      >>> _ = bn(jnp.ones((4, 3)))                          # training mode: one update
      >>> {name: int(v) for name, v in nnx.state(bn, BatchCounter).items()}
      {'count': 1, 'skipped': 0}
      >>> sorted(nnx.state(bn, nnx.BatchStat).keys())       # exactly flax's batch statistics
      ['mean', 'var']
    """


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
        promote_dtype,
    ):
        if promote_dtype is not None:
            raise ValueError(
                "bnjax modules do not take `promote_dtype`: `dtype` is the output dtype "
                "(None promotes x and the parameters) and statistics are always float32."
            )
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
        """(x for the core, scale, bias, output dtype)."""
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, out_dtype = promote(x, scale, bias, self.dtype)
        return x, scale, bias, out_dtype


class _RunningStats(_Affine):
    """BatchNorm's constructor (flax's arguments, then bnjax's) and mode switching, shared
    with BatchRenorm."""

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
        promote_dtype: Any = None,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
        ghost_batch_size: int | None = None,
        use_unbiased_running_var: bool = False,
    ):
        shape = _shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.count = BatchCounter(jnp.zeros((), jnp.int32))
        self.skipped = BatchCounter(jnp.zeros((), jnp.int32))
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
            promote_dtype=promote_dtype,
        )
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.dtype, self.param_dtype = dtype, param_dtype
        self.use_bias, self.use_scale = use_bias, use_scale
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.ghost_batch_size = ghost_batch_size
        self.use_unbiased_running_var = use_unbiased_running_var

    def _training(self, use_running_average) -> bool:
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                f"{type(self).__name__} needs `use_running_average`: set it in the constructor, "
                f"call model.train() / model.eval(), or pass it to the call."
            )
        return not use_running_average

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
        bias_init, scale_init, axis_name, axis_index_groups, rngs, bias_metadata,
        scale_metadata: as in flax. `momentum=None` keeps a cumulative average.
      use_fast_variance: accepted, ignored (statistics are always two-pass float32).
      promote_dtype: must be None (see the module docstring).
      ghost_batch_size, use_unbiased_running_var: see `bnjax.batch_norm`.

    Shapes: x (N, ..., C) with axis=-1; scale, bias, mean, var (C,).

    Example:
      >>> bn = BatchNorm(3, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))  # training: updates mean, var, count
      >>> int(bn.count[...]), (bn.mean[...] * 1000).round().tolist()
      (1, [45.0, 55.0, 65.0])
      >>> bn.eval()  # now evaluates with the running statistics
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x`; `use_running_average` overrides the attribute for this call.

        `mask`: (N,) per example or broadcastable to x; False entries stay out of the
        statistics (they are still normalized).
        """
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        state = BatchNormState(self.mean[...], self.var[...], self.count[...], self.skipped[...])
        y, new = batch_norm(x, state, scale, bias, mask=mask, **self._options(training))
        if training:
            self.mean[...], self.var[...] = new.mean, new.var
            self.count[...], self.skipped[...] = new.count, new.skipped
        return y.astype(out_dtype)


class BatchRenorm(_RunningStats):
    """Batch renormalization (`bnjax.batch_renorm`), with BatchNorm's arguments.

    State: ``nnx.BatchStat`` mean, var (evaluation), renorm_mean, renorm_var (what r and d are
    measured against) and the int32 step that drives `schedule`; `BatchCounter` count, skipped.

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
        renorm_momentum: float = 0.99,
        r_max: float | None = None,
        d_max: float | None = None,
        schedule: RenormSchedule | None = None,
        **batch_norm_arguments,
    ):
        super().__init__(num_features, **batch_norm_arguments)
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
        state = BatchRenormState(
            self.mean[...],
            self.var[...],
            self.renorm_mean[...],
            self.renorm_var[...],
            self.count[...],
            self.skipped[...],
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
            self.count[...], self.skipped[...], self.step[...] = new.count, new.skipped, new.step
        return y.astype(out_dtype)


class _Stateless(_Affine):
    """Constructor shared by GroupNorm, LayerNorm and InstanceNorm (flax's common arguments)."""

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
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = None,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        refuse(type(self).__name__, axis_name=axis_name)
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
            promote_dtype=promote_dtype,
        )
        self.num_features = num_features
        self.epsilon, self.dtype, self.param_dtype = epsilon, dtype, param_dtype
        self.use_bias, self.use_scale = use_bias, use_scale
        self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
        self.use_fast_variance = use_fast_variance


class GroupNorm(_Stateless):
    """Group normalization (`bnjax.group_norm`), a drop-in for ``flax.nnx.GroupNorm``.

    Args:
      num_features: channels C (the last axis); num_groups (default 32) or group_size: exactly
        one, dividing C. reduction_axes: None (all but the first axis) or trailing axes ending
        with the last. Other arguments: as `LayerNorm`'s.

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
        reduction_axes: Axes | None = None,
        **kwargs,
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
        super().__init__(num_features, **kwargs)
        self.num_groups = divisor if group_size is None else num_features // divisor
        self.group_size = num_features // self.num_groups
        self.reduction_axes = reduction_axes

    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask` is not supported yet."""
        refuse("GroupNorm", mask=mask)
        x, scale, bias, out_dtype = self._inputs(x)
        y = group_norm_flax_axes(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=None,
            epsilon=self.epsilon,
            reduction_axes=self.reduction_axes,
        )
        return y.astype(out_dtype)


class LayerNorm(_Stateless):
    """Layer normalization (`bnjax.layer_norm`), a drop-in for ``flax.nnx.LayerNorm``.

    Args:
      num_features: size of x along `feature_axes` (scale and bias shape).
      epsilon (1e-6), dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, rngs,
        bias_metadata, scale_metadata, reduction_axes (-1), feature_axes (-1): as in flax.
      axis_name, axis_index_groups: not supported yet (raise if set).
      use_fast_variance: accepted, ignored. promote_dtype: must be None.

    Example:
      >>> print(LayerNorm(3, rngs=nnx.Rngs(0))(jnp.array([[1.0, 2.0, 3.0]])))
      [[-1.224744  0.        1.224744]]
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        **kwargs,
    ):
        super().__init__(num_features, **kwargs)
        self.reduction_axes, self.feature_axes = reduction_axes, feature_axes

    def __call__(self, x, *, mask=None):
        """Normalizes `x`; `mask` is not supported yet."""
        refuse("LayerNorm", mask=mask)
        x, scale, bias, out_dtype = self._inputs(x)
        y = layer_norm(
            x,
            scale,
            bias,
            epsilon=self.epsilon,
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
        )
        return y.astype(out_dtype)


class InstanceNorm(_Stateless):
    """Instance normalization (`bnjax.instance_norm`), a drop-in for ``flax.nnx.InstanceNorm``.

    Args:
      num_features: channels C; feature_axes (-1): where they are. Other arguments: as
        `LayerNorm`'s. Statistics per example and channel over the other non-batch axes.

    Example:
      >>> layer = InstanceNorm(4, rngs=nnx.Rngs(0))
      >>> layer(jnp.arange(16.0).reshape(1, 2, 2, 4)).std(axis=(1, 2)).round(3)
      Array([[1., 1., 1., 1.]], dtype=float32)
    """

    def __init__(self, num_features: int | Sequence[int], *, feature_axes: Axes = -1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.feature_axes = feature_axes

    def __call__(self, x, *, mask=None):
        """Normalizes x of shape (N, ..., C); `mask` is not supported yet."""
        refuse("InstanceNorm", mask=mask)
        x, scale, bias, out_dtype = self._inputs(x)
        y = instance_norm_flax_axes(
            x, scale, bias, epsilon=self.epsilon, feature_axes=self.feature_axes
        )
        return y.astype(out_dtype)
