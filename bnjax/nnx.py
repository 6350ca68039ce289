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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers
from flax.nnx.nn import linear as nnx_linear
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

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
from bnjax.core.domain_batch_norm import DomainBatchNormState, domain_batch_norm
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

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

# Each module is a dataclass, so each option is declared once, with its default and its doc,
# on the class that introduces it, and the subclasses inherit it: the generated __init__ is
# the constructor (IDE-visible, as flax's: `num_features` positional, the options keywords).
# `eq=False` keeps identity hashing (nnx graphs key modules by identity); `repr=False` keeps
# nnx's repr. Constructor-only arguments (rngs, initializers, metadata) are InitVars: they
# create the variables in __post_init__ and are not stored, exactly as flax does.


def _shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    return (num_features,) if isinstance(num_features, int) else tuple(num_features)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class _Module(nnx.Module):
    """The options all six modules share (flax's), and the call-time dtype plumbing."""

    num_features: int | Sequence[int] = dataclasses.field(kw_only=False)
    """Size of x along the feature axes (scale, bias and statistics shape); a tuple for
    several feature axes."""
    dtype: Dtype | None = None
    """Output dtype (flax's rule: None promotes x and the parameters)."""
    param_dtype: Dtype = jnp.float32
    """dtype of the created scale and bias."""
    use_scale: bool = True
    """Learn a per-feature scale (else 1)."""
    scale_init: dataclasses.InitVar[Initializer] = initializers.ones
    """Initializer of the scale (one ``rngs.params()`` key, as flax)."""
    axis_name: str | None = None
    """The mapped axis (pmap, shard_map) whose devices share statistics (an exact merge)."""
    axis_index_groups: Any = None
    """Sub-groups of the devices of `axis_name` (pmap only)."""
    use_fast_variance: bool = True
    """Accepted for flax's sake: statistics are always exact two-pass float32."""
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype
    """Applied to (x, scale, bias) before the core, as in flax."""
    rngs: dataclasses.InitVar[nnx.Rngs]
    """Keys for the initializers (required, as in flax)."""
    scale_metadata: dataclasses.InitVar[Mapping[str, Any]] = _NO_METADATA
    """Extra metadata of the scale ``nnx.Param``."""

    def __post_init__(self, scale_init, rngs, scale_metadata):
        self._create_affine(rngs, scale_init, scale_metadata)

    def _create_affine(
        self, rngs, scale_init, scale_metadata, bias_init=None, bias_metadata=_NO_METADATA
    ):
        """'scale' and 'bias' the way flax creates them: one ``rngs.params()`` key each, scale
        first, so the layers around keep their init."""
        shape = _shape(self.num_features)
        self.scale = (
            nnx.Param(scale_init(rngs.params(), shape, self.param_dtype), **scale_metadata)
            if self.use_scale
            else nnx.data(None)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), shape, self.param_dtype), **bias_metadata)
            if self.use_bias
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

    def _device_options(self) -> dict:
        return dict(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class _WithBias(_Module):
    """The bias options of every module but RMSNorm."""

    use_bias: bool = True
    """Learn a per-feature bias (else 0)."""
    bias_init: dataclasses.InitVar[Initializer] = initializers.zeros
    """Initializer of the bias."""
    bias_metadata: dataclasses.InitVar[Mapping[str, Any]] = _NO_METADATA
    """Extra metadata of the bias ``nnx.Param``."""

    def __post_init__(self, scale_init, rngs, scale_metadata, bias_init, bias_metadata):
        # The InitVars arrive in declaration order: `_Module`'s three, then these two.
        self._create_affine(rngs, scale_init, scale_metadata, bias_init, bias_metadata)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class _RunningStats(_WithBias):
    """BatchNorm's state and options (flax's, then bnjax's) and mode switching, shared with
    BatchRenorm."""

    use_running_average: bool | None = False
    """True evaluates with the running statistics; ``model.train()`` / ``model.eval()`` and
    the call argument switch it, as in flax."""
    axis: int | Sequence[int] = -1
    """The feature axis or axes (NHWC: -1, NCHW: 1)."""
    momentum: float | None = 0.99
    """Decay of the running average (flax's convention; PyTorch's 0.1 is 0.9); None keeps a
    cumulative average (needs `track_counters`)."""
    epsilon: float = 1e-5
    """Added to the variance before the square root."""
    ghost_batch_size: int | None = None
    """Normalize each group of this many examples with its own statistics (training only);
    see `bnjax.batch_norm`."""
    use_unbiased_running_var: bool = False
    """Store the unbiased variance ``var * n / (n - 1)`` in `var`, like PyTorch."""
    track_counters: bool = False
    """Keep int32 ``count`` (batches folded in) and ``skipped`` (batches left out) as
    ``nnx.BatchStat``."""

    def __post_init__(self, *init_only):
        if self.momentum is None and not self.track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: pass track_counters=True to keep that count."
            )
        shape = _shape(self.num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        if self.track_counters:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
            self.skipped = nnx.BatchStat(jnp.zeros((), jnp.int32))
        super().__post_init__(*init_only)

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
            ghost_batch_size=self.ghost_batch_size if training else None,
            use_unbiased_running_var=self.use_unbiased_running_var,
            **self._device_options(),
        )

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: True evaluates with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
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

    Each option is documented where it is declared (`_RunningStats`, `_WithBias`, `_Module`).

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


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
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

    renorm_momentum: float = 0.99
    """Decay of renorm_mean and renorm_var."""
    r_max: float | None = None
    """Fixed clipping bound of r (>= 1), with `d_max`; None follows `schedule`."""
    d_max: float | None = None
    """Fixed clipping bound of d (>= 0), with `r_max`; None follows `schedule`."""
    schedule: RenormSchedule | None = None
    """The warm-up of the bounds (None: `bnjax.RenormSchedule()`, the paper's)."""

    def __post_init__(self, *init_only):
        super().__post_init__(*init_only)
        shape = _shape(self.num_features)
        self.renorm_mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.renorm_var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))

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


# Convolutions with a weight-standardized or centered kernel (drop-ins for flax's nnx.Conv).
from bnjax.nnx_standardized_conv import CenteredConv, StandardizedConv  # noqa: E402

__all__ += ["CenteredConv", "StandardizedConv"]
# ------------------------------------------------------------ moving average batch norm


class BackwardProbe(nnx.Variable):
    """A zero input whose gradient is a `MovingAverageBatchNorm`'s backward batch statistics
    (g_B, psi_B), shape (2, *feature_shape).

    Example:
      >>> layer = MovingAverageBatchNorm(4, rngs=nnx.Rngs(0))
      >>> type(layer.probe).__name__, layer.probe[...].shape
      ('BackwardProbe', (2, 4))
    """


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class MovingAverageBatchNorm(_WithBias):
    """Moving average batch normalization (`bnjax.moving_average_batch_norm`, MABN).

    The state is ``nnx.BatchStat`` 'mean', 'var' (C,), the four histories (window - 1, C) and
    int32 'count', 'backward_count', 'skipped' (see `bnjax.MovingAverageBatchNormState`);
    ``probe`` is a `BackwardProbe` of zeros (2, C). Differentiate the loss with respect to the
    probes too (e.g. ``nnx.grad(loss, argnums=nnx.DiffState(0, (nnx.Param, BackwardProbe)))``)
    and pass each layer's probe gradient to `update_backward_statistics` after the step.

    Example:
      >>> layer = MovingAverageBatchNorm(3, window=2, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> grads = nnx.grad(lambda m: jnp.sum(m(x) * x),
      ...                  argnums=nnx.DiffState(0, BackwardProbe))(layer)
      >>> layer.update_backward_statistics(grads["probe"][...])
      >>> int(layer.count[...]), int(layer.backward_count[...])
      (1, 1)
    """

    use_running_average: bool | None = False
    """True evaluates with the running statistics; ``model.train()`` / ``model.eval()`` and
    the call argument switch it, as in flax."""
    axis: int | Sequence[int] = -1
    """The feature axis or axes (NHWC: -1, NCHW: 1)."""
    momentum: float = 0.98
    """Decay of the exponential averages 'mean' and 'var'."""
    epsilon: float = 1e-5
    """Added to the variance (second moment) before the square root."""
    window: int = 16
    """Steps m of the simple moving averages (1: the current batch only)."""
    centered: bool = False
    """Keep the mean statistics (else the second moment only, the paper's reduced form)."""
    r_max: float = 5.0
    """Bound of the renormalization factor r (1: none)."""
    d_max: float = 5.0
    """Bound of the renormalization shift d (centered only; 0: none)."""
    renorm_warmup_steps: int = 1000
    """Training steps before renormalization starts."""

    def __post_init__(self, *init_only):
        fresh = moving_average_batch_norm_state(_shape(self.num_features), window=self.window)
        for name, value in fresh._asdict().items():
            setattr(self, name, nnx.BatchStat(value))
        self.probe = BackwardProbe(moving_average_batch_norm_probe(fresh))
        super().__post_init__(*init_only)

    def statistics(self) -> dict:
        """{name: nnx.BatchStat} of the state, in `MovingAverageBatchNormState`'s order."""
        return {name: getattr(self, name) for name in MovingAverageBatchNormState._fields}

    def _state(self) -> MovingAverageBatchNormState:
        return MovingAverageBatchNormState(**{n: v[...] for n, v in self.statistics().items()})

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        use_running_average = check_use_running_average(use_running_average)
        if use_running_average is None:
            use_running_average = check_use_running_average(self.use_running_average)
        training = not use_running_average
        x, scale, bias, out_dtype = self._inputs(x)
        y, new = moving_average_batch_norm(
            x,
            self._state(),
            scale,
            bias,
            self.probe[...],
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            centered=self.centered,
            r_max=self.r_max,
            d_max=self.d_max,
            renorm_warmup_steps=self.renorm_warmup_steps,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        if training:
            for name, variable in self.statistics().items():
                variable[...] = getattr(new, name)
        return y.astype(out_dtype)

    def update_backward_statistics(self, probe_grad) -> None:
        """Folds this step's backward statistics (the gradient of `probe`) into the state."""
        new = moving_average_batch_norm_backward_update(self._state(), probe_grad)
        for name, variable in self.statistics().items():
            variable[...] = getattr(new, name)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: True evaluates with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


__all__ += ["BackwardProbe", "MovingAverageBatchNorm"]


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class DomainBatchNorm(_RunningStats):
    """Domain-specific batch normalization (`bnjax.domain_batch_norm`): running statistics,
    and by default scale and bias, per domain, chosen per example by an integer index.

    Args:
      num_features: channels C (or the feature shape, for several feature axes).
      num_domains, per_domain_affine, default_domain: see their declarations below (and
        `bnjax.linen.DomainBatchNorm`).
      the other options: as `BatchNorm`; `track_counters` keeps (D,) int32 counters.

    Shapes: x (N, ..., C) with axis=-1, domain (N,); mean, var (D, C); scale, bias (D, C),
    or (C,) when shared.

    Example:
      >>> bn = DomainBatchNorm(3, num_domains=2, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(24.0).reshape(8, 3)
      >>> y = bn(x, domain=jnp.array([0, 0, 0, 0, 1, 1, 1, 1]))     # training
      >>> bn.mean[...].shape, bn.scale[...].shape
      ((2, 3), (2, 3))
      >>> bn.eval()  # now each example uses its domain's running statistics
    """

    num_domains: int = 2
    """D, the number of domains (row d of the statistics belongs to domain d)."""
    per_domain_affine: bool = True
    """One scale and bias per domain, (D, C) (DSBN, AdvProp's auxiliary BN, FedBN); False
    shares one (C,) pair (SiloBN)."""
    default_domain: int | None = 0
    """Domain of every example when the call passes no `domain` (None: `domain` required)."""

    def __post_init__(self, *init_only):
        super().__post_init__(*init_only)
        num_domains = as_int(self.num_domains, "num_domains")
        if num_domains < 1:
            raise ValueError(f"`num_domains` must be a positive int, got {num_domains!r}.")

        def stacked(value):
            return jnp.broadcast_to(value, (num_domains, *value.shape))

        # Every domain starts from the same statistics and the same initial affine (the
        # initializer's draw for one domain, so the rng use is flax's BatchNorm's).
        self.mean = nnx.BatchStat(stacked(self.mean[...]))
        self.var = nnx.BatchStat(stacked(self.var[...]))
        if self.track_counters:
            self.count = nnx.BatchStat(jnp.zeros((num_domains,), jnp.int32))
            self.skipped = nnx.BatchStat(jnp.zeros((num_domains,), jnp.int32))
        if self.per_domain_affine:
            for name in ("scale", "bias"):
                param = getattr(self, name)
                if param is not None:
                    setattr(self, name, param.replace(stacked(param[...])))

    def _counter_values(self):
        if not self.track_counters:
            return (jnp.zeros((self.mean.shape[0],), jnp.int32),) * 2
        return self.count[...], self.skipped[...]

    def __call__(self, x, use_running_average: bool | None = None, *, domain=None, mask=None):
        """Normalizes `x` by each example's domain (`domain`: int (N,) or one int; None:
        `default_domain`); `use_running_average` overrides the attribute for this call."""
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        if domain is None:
            if self.default_domain is None:
                raise TypeError(
                    "DomainBatchNorm has default_domain=None, so the call needs `domain`: an "
                    f"int array of shape ({x.shape[0]},) of domain indices."
                )
            domain = jnp.full((x.shape[0],), self.default_domain, jnp.int32)
        state = DomainBatchNormState(self.mean[...], self.var[...], *self._counter_values())
        y, new = domain_batch_norm(
            x, state, scale, bias, domain=domain, mask=mask, **self._options(training)
        )
        if training:
            self.mean[...], self.var[...] = new.mean, new.var
            self._store_counters(new)
        return y.astype(out_dtype)


# ------------------------------------------------------------ normalization-activation layers

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


__all__ += ["EvoNormB0", "EvoNormS0", "FilterResponseNorm"]


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


__all__ += ["CrossIterationConvBatchNorm"]
