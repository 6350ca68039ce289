"""flax.nnx BatchNorm and BatchRenorm: running statistics as ``nnx.BatchStat``."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    RenormSchedule,
    batch_norm,
    batch_renorm,
)
from bnjax.nnx._shared import (
    _RunningStats,
    _shape,
)


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
