"""Batch renormalization (Ioffe, 2017) as a pure function with an explicit state pytree.

Batch norm trains with the statistics of each batch but evaluates with running statistics; with
small or non-i.i.d. batches the two disagree. Batch renorm corrects the batch statistics towards
running ones with per-channel factors r and d that carry no gradient:

    mu_B, var_B = batch mean and biased variance,      sigma_B = sqrt(var_B + epsilon)
    sigma = sqrt(renorm_var + epsilon)                  (renorm_mean, renorm_var: running)
    r = clip(sigma_B / sigma, 1 / r_max, r_max)
    d = clip((mu_B - renorm_mean) / sigma, -d_max, d_max)
    y = scale * ((x - mu_B) / sigma_B * r + d) + bias

Unclipped, y = scale * (x - renorm_mean) / sigma + bias: normalization with running statistics,
as in evaluation, while the gradient still flows through mu_B and sigma_B. With r_max = 1 and
d_max = 0 it is batch norm. Because r and d are constants for the gradient,
y = (scale * r) * x_hat + (scale * d + bias) is the batch-norm kernel with an effective scale
and bias, and autodiff outside the kernel gives dscale = sum dy * (x_hat * r + d), dbias = sum dy.

The state keeps two sets of running statistics, as Keras does: (mean, var) for evaluation,
updated with `momentum` exactly as `batch_norm` updates its state, and (renorm_mean, renorm_var)
for r and d, updated with `renorm_momentum` and always biased, so that r -> 1 and d -> 0 once
they track the batches. (The paper keeps one set and averages sigma itself; averaging the
variance keeps the state in batch norm's terms. Pass renorm_momentum=momentum for one set.)
r and d use the renorm statistics from before this batch's update.

References:
  Ioffe (2017), Batch Renormalization: Towards Reducing Minibatch Dependence in
  Batch-Normalized Models, NeurIPS, arXiv:1702.03275.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.batch_layout import as_param, grouped_mask
from bnjax.core.batch_norm import (
    BatchNormState,
    batch_norm_state,
    check_call,
    evaluate,
    plan_training,
)
from bnjax.core.batch_normalize import batch_moments, normalize
from bnjax.core.running_update import (
    all_finite,
    batch_statistics_for_update,
    counters_after,
    updated_statistics,
)
from bnjax.core.state_guard import guard_statistics

__all__ = [
    "BatchRenormState",
    "RenormSchedule",
    "batch_renorm",
    "batch_renorm_state",
]

Array = jax.Array


class BatchRenormState(NamedTuple):
    """Running statistics of a batch-renorm layer (a pytree; pass it in, get it back).

    Attributes:
      mean: evaluation mean (feature shape, float32), as in BatchNormState.
      var: evaluation variance (feature shape, float32), as in BatchNormState.
      renorm_mean: the mean r and d are measured against.
      renorm_var: the (biased) variance r and d are measured against.
      count: int32 scalar, batches folded into the running statistics.
      skipped: int32 scalar, training batches left out because their statistics were not finite
        (or had fewer than two valid values in every feature).
      step: int32 scalar, finite training batches seen; drives the warm-up schedule. Separate
        from `count` so that resetting or recalibrating statistics does not restart the warm-up.

    Example:
      >>> x = jnp.array([[1.0], [3.0]])
      >>> _, state = batch_renorm(x, batch_renorm_state(1), training=True, momentum=0.5)
      >>> state.mean.tolist(), int(state.step)
      ([1.0], 1)
      >>> round(float(state.renorm_mean[0]), 6)           # renorm_momentum: 0.99 by default
      0.02
      >>> state.as_batch_norm_state().var.tolist()
      [1.0]
    """

    mean: Array
    var: Array
    renorm_mean: Array
    renorm_var: Array
    count: Array
    skipped: Array
    step: Array

    def as_batch_norm_state(self) -> BatchNormState:
        """The evaluation statistics as a BatchNormState (for folding, recalibration, ...)."""
        return BatchNormState(self.mean, self.var, self.count, self.skipped)


def batch_renorm_state(num_features: int | Sequence[int], dtype=None) -> BatchRenormState:
    """A fresh state: means 0, variances 1, step 0.

    Example:
      >>> state = batch_renorm_state(8)
      >>> state.renorm_var.shape, state.step.item()
      ((8,), 0)
    """
    fresh = batch_norm_state(num_features, dtype)
    return BatchRenormState(
        fresh.mean, fresh.var, fresh.mean, fresh.var, fresh.count, fresh.skipped, fresh.count
    )


class RenormSchedule(NamedTuple):
    """Warm-up of the clipping bounds, driven by `BatchRenormState.step`.

    Plain batch norm (r_max = 1, d_max = 0) up to step `warmup_steps`, while the renorm
    statistics settle; then each bound moves linearly to its final value over its relax steps
    (reached at step warmup_steps + relax_steps; relax_steps=0 jumps there right away).
    The defaults are the paper's ImageNet run: r_max 1 -> 3 between steps 5k and 40k, d_max
    0 -> 5 between 5k and 25k. Scale the three step counts with the length of your run.

    Example:
      >>> schedule = RenormSchedule(warmup_steps=100, r_relax_steps=100, d_relax_steps=50)
      >>> [tuple(float(b) for b in schedule.bounds(step)) for step in (0, 100, 125, 150, 200)]
      [(1.0, 0.0), (1.0, 0.0), (1.5, 2.5), (2.0, 5.0), (3.0, 5.0)]
    """

    warmup_steps: int = 5_000
    r_max: float = 3.0
    r_relax_steps: int = 35_000
    d_max: float = 5.0
    d_relax_steps: int = 20_000

    def bounds(self, step, dtype=jnp.float32) -> tuple[Array, Array]:
        """(r_max, d_max) at `step` (a traced int is fine)."""
        step = jnp.asarray(step, dtype)

        def progress(relax_steps):
            fraction = (step - self.warmup_steps) / jnp.maximum(relax_steps, 1)
            done = step >= self.warmup_steps + relax_steps
            return jnp.where(done, 1.0, jnp.clip(fraction, 0.0, 1.0)).astype(dtype)

        r_max = 1.0 + (self.r_max - 1.0) * progress(self.r_relax_steps)
        return r_max, self.d_max * progress(self.d_relax_steps)


def renorm_correction(batch_mean, batch_var, renorm_mean, renorm_var, r_max, d_max, epsilon):
    """(r, d) of the module docstring, with no gradient, broadcast like the inputs."""
    batch_mean, batch_var, renorm_mean, renorm_var = map(
        lax.stop_gradient, (batch_mean, batch_var, renorm_mean, renorm_var)
    )
    inv_sigma = lax.rsqrt(renorm_var + epsilon)
    r = jnp.clip(jnp.sqrt(batch_var + epsilon) * inv_sigma, 1.0 / r_max, r_max)
    d = jnp.clip((batch_mean - renorm_mean) * inv_sigma, -d_max, d_max)
    return r, d


def _check_bound(value, name: str, low: float, why: str = "") -> None:
    # Values known at trace time (Python and NumPy numbers, concrete arrays) are checked;
    # traced bounds (a user's own schedule) cannot be.
    checks.check_in_range(value, name, low, why=why)


def _bounds(state, r_max, d_max, schedule, dtype) -> tuple[Array, Array]:
    if (r_max is None) != (d_max is None):
        raise ValueError(
            "Pass both `r_max` and `d_max` (fixed bounds; float('inf') leaves one unclipped) or "
            f"neither (the warm-up `schedule`), got r_max={r_max!r}, d_max={d_max!r}."
        )
    if r_max is not None:
        if schedule is not None:
            raise ValueError("Pass either fixed `r_max`/`d_max` or a `schedule`, not both.")
        _check_bound(r_max, "r_max", 1.0, " (1 is batch norm)")
        _check_bound(d_max, "d_max", 0.0, " (0 is batch norm)")
        return jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)
    schedule = RenormSchedule() if schedule is None else schedule
    if not isinstance(schedule, RenormSchedule):
        raise TypeError(f"`schedule` must be a RenormSchedule, got {type(schedule)}.")
    _check_bound(schedule.r_max, "schedule.r_max", 1.0, " (1 is batch norm)")
    _check_bound(schedule.d_max, "schedule.d_max", 0.0, " (0 is batch norm)")
    for name in ("warmup_steps", "r_relax_steps", "d_relax_steps"):
        _check_bound(getattr(schedule, name), f"schedule.{name}", 0)
    return schedule.bounds(state.step, dtype)


_STATISTICS = ("mean", "var", "renorm_mean", "renorm_var")


def _check_state(state, feature_shape, axis) -> BatchRenormState:
    if not isinstance(state, BatchRenormState):
        raise TypeError(
            "`state` must be a BatchRenormState (from bnjax.batch_renorm_state), got "
            f"{type(state).__name__}."
        )
    checks.check_statistics(state, _STATISTICS, feature_shape, axis, "batch_renorm_state")
    return checks.as_counters(state, ("count", "skipped", "step"), "batch_renorm_state")


def batch_renorm(
    x: Array,
    state: BatchRenormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    momentum: float | None = 0.99,
    renorm_momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max: float | Array | None = None,
    d_max: float | Array | None = None,
    schedule: RenormSchedule | None = None,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: int | None = None,
    mask: Array | None = None,
    use_unbiased_running_var: bool = False,
) -> tuple[Array, BatchRenormState]:
    """Batch renormalization: ``y = scale * (x_hat * r + d) + bias`` (see the module docstring).

    Args:
      x: input, as in `batch_norm` (statistics in float32, y in x's dtype).
      state: BatchRenormState with the feature shape (see `batch_renorm_state`).
      training: True normalizes with the corrected batch statistics and updates the state;
        False is exactly `batch_norm` evaluation with (state.mean, state.var), state unchanged.
      momentum: decay of the evaluation statistics (flax/Keras convention; None = cumulative).
      renorm_momentum: decay of the renorm statistics r and d are measured against (Keras).
      r_max: fixed clipping bound of r (>= 1; a float or a traced scalar); with `d_max`.
      d_max: fixed clipping bound of d (>= 0; a float or a traced scalar); with `r_max`.
        Leave both None to follow `schedule`.
      schedule: a RenormSchedule evaluated at `state.step`; default `RenormSchedule()`.
      scale: optional (C,) parameter; None means 1.
      bias: optional (C,) parameter; None means 0.
      epsilon: added to the variances, as in `batch_norm`.
      axis: feature axis or axes, as in `batch_norm`.
      axis_name: the mapped axis whose devices share statistics, as in `batch_norm`.
      axis_index_groups: sub-groups of devices of `axis_name` (pmap only).
      mask: booleans broadcastable to x (flax's rule), as in `batch_norm`.
      use_unbiased_running_var: store the unbiased variance, like PyTorch.
      ghost_batch_size: r and d per ghost batch, each against the same renorm statistics; the
        updates take the mean of the ghost batches' statistics, as in `batch_norm`.

    Returns:
      (y, new_state). A training batch whose statistics are not finite, or that has fewer
      than two valid values in every feature, updates nothing but `state.skipped` (neither the
      statistics, `count` nor `step`); a feature with fewer than two valid values keeps both
      its sets of statistics. A known negative variance (`var`, `renorm_var`) raises, as in
      `batch_norm`. Incoming statistics (any of
      the four) that are not finite are handled as in `batch_norm`: a ValueError when their
      values are known, else the state comes back unchanged (not even `skipped` advances) and
      on CPU and TPU a RuntimeWarning names the field at run time.

    Example:
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> state = batch_renorm_state(3)
      >>> y, state = batch_renorm(x, state, training=True, r_max=3.0, d_max=5.0)
      >>> state.step.item(), y.shape
      (1, (4, 3))
    """
    given_state = state
    x, state, scale, bias, layout, training, use_unbiased_running_var = check_call(
        x,
        state,
        scale,
        bias,
        check_state=_check_state,
        training=training,
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
        use_unbiased_running_var=use_unbiased_running_var,
    )
    checks.check_momentum(renorm_momentum, "renorm_momentum", allow_none=False)
    dtype = stats.stats_dtype(x.dtype)
    r_bound, d_bound = _bounds(state, r_max, d_max, schedule, dtype)
    if not training:  # batch_norm's evaluation, on (mean, var)
        y = evaluate(
            x,
            state.as_batch_norm_state(),
            scale,
            bias,
            epsilon=epsilon,
            layout=layout,
            function="batch_renorm",
        )
        return y, given_state
    guard = guard_statistics(state, _STATISTICS, "batch_renorm")

    plan = plan_training(
        x,
        layout,
        function="batch_renorm",
        axis=axis,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
    )
    grouped_x = x.reshape(layout.grouped_shape)
    grouped_mask_ = grouped_mask(mask, x, layout)
    # r and d must enter the kernel, which computes the batch moments itself, so they are
    # computed here too. Under jit XLA merges the duplicates (same ops on the same operands):
    # the compiled step reduces x, and all-reduces, as often as batch_norm's does.
    moments = batch_moments(lax.stop_gradient(grouped_x), grouped_mask_, plan.kernel)
    r, d = renorm_correction(
        moments.mean,
        moments.m2 / jnp.maximum(moments.count, 1),
        as_param(state.renorm_mean, layout, 0.0, dtype),
        as_param(state.renorm_var, layout, 1.0, dtype),
        r_bound,
        d_bound,
        epsilon,
    )
    scale = as_param(scale, layout, 1.0, dtype)
    bias = as_param(bias, layout, 0.0, dtype)
    grouped_y, mean, var, count = normalize(
        grouped_x, scale * r, scale * d + bias, grouped_mask_, plan.kernel, plan.epsilon
    )

    def update(running_mean, running_var, unbiased: bool, decay):
        batch = batch_statistics_for_update(
            lax.stop_gradient(mean),
            lax.stop_gradient(var),
            count,
            layout,
            plan,
            use_unbiased_running_var=unbiased,
        )
        # Features with fewer than two valid values keep their statistics (as in batch_norm);
        # the biased and unbiased updates agree on which those are.
        new = updated_statistics(running_mean, running_var, batch, state.count, decay)
        return new, batch.any_estimated

    evaluation, estimated = update(state.mean, state.var, use_unbiased_running_var, momentum)
    renorm, _ = update(state.renorm_mean, state.renorm_var, False, renorm_momentum)
    # Skip the batch for both sets when either is not finite, or when it estimated no feature,
    # so the sets stay in step. A state that was not finite to begin with is not the batch's
    # fault: it stays as it is, and the batch is not counted as skipped.
    finite = all_finite(*evaluation, *renorm) & estimated
    new_state = BatchRenormState(
        mean=jnp.where(finite, evaluation[0], state.mean),
        var=jnp.where(finite, evaluation[1], state.var),
        renorm_mean=jnp.where(finite, renorm[0], state.renorm_mean),
        renorm_var=jnp.where(finite, renorm[1], state.renorm_var),
        step=state.step + finite.astype(jnp.int32),  # the warm-up counts folded batches
        **counters_after(state, finite, guard),
    )
    return grouped_y.reshape(x.shape), new_state
