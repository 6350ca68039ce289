"""The dataclass bases the flax.nnx modules share: flax's options, 'scale'/'bias' creation,
the call-time dtype plumbing, BatchNorm's state and mode switching."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from bnjax.module_common import check_use_running_average, promote

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
