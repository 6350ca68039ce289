"""flax.linen BatchNorm and BatchRenorm: running statistics, flax's variables."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    RenormSchedule,
    batch_norm,
    batch_renorm,
)
from bnjax.linen._shared import (
    _feature_shape,
    _RunningStats,
)
from bnjax.module_common import promote


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
