"""Exact population statistics from per-batch moments: accumulate, then write a state.

Each batch is summarised per channel by ``Moments(count, mean, m2)`` (``m2 = sum (x - mean)^2``)
and merged exactly into a running total (`bnjax.core.stats.combine`, Chan et al.), so the
result is the mean and variance of all the values, not an average of per-batch variances:

    mean = sum_i x_i / n,      var = m2 / n  (biased)   or   m2 / (n - 1)  (unbiased)

Pure and jittable: `accumulate` runs inside a jitted loop body or a ``lax.scan``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax.core import BatchNormState, BatchRenormState, EvoNormB0State, batch_norm_state, stats
from bnjax.lifecycle.layers import merge_calls

__all__ = ["LayerInput", "Total", "accumulate", "empty_totals", "population_state"]


class LayerInput(NamedTuple):
    """A functional layer's input for `recalibrate_states`: x, its feature axis (or axes), a
    mask (broadcast against x as the modules apply it).

    Example:
      >>> from bnjax import lifecycle
      >>> def layer_inputs(states, batch, training):     # one BN over axis 1 (NCHW)
      ...     return {"bn": LayerInput(batch, axis=1)}
      >>> batch = jnp.ones((4, 2, 3, 3)) * jnp.array([0.0, 1.0])[:, None, None]
      >>> states = {"bn": bnjax.batch_norm_state(2)}
      >>> states = lifecycle.recalibrate_states(layer_inputs, states, [batch])
      >>> states["bn"].mean.tolist(), states["bn"].var.tolist()
      ([0.0, 1.0], [0.0, 0.0])
    """

    x: jax.Array
    axis: int | tuple[int, ...] = -1
    mask: jax.Array | None = None


class Total(NamedTuple):
    """A layer's accumulated statistics: exact moments, batches merged, batches left out.

    The moments are kept as those of ``x - shift``, with `shift` the first batch's mean (per
    channel): the accumulated mean is then a small number that every merge updates without
    rounding at the scale of |mean|. Over 3000 batches at |mean| = 1000 std, a running
    ``sum(count * mean) / n`` drifts by 1e-2 std; this stays within float32 rounding of the
    float64 mean. `moments` gives the moments of x itself.

    Example:
      >>> total = empty_totals({"bn": bnjax.Moments(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))})
      >>> total["bn"].moments.count.tolist(), int(total["bn"].batches), int(total["bn"].skipped)
      ([0.0, 0.0], 0, 0)
    """

    shifted: stats.Moments
    batches: jax.Array
    skipped: jax.Array
    shift: jax.Array | float = 0.0

    @property
    def moments(self) -> stats.Moments:
        """The accumulated moments of x (mean = shift + the shifted mean)."""
        return self.shifted._replace(mean=self.shifted.mean + self.shift)


def accumulate(totals: Mapping[Any, Total], new: Mapping[Any, stats.Moments]) -> dict:
    """Merges one batch's per-layer moments into running totals, exactly (pure, jittable).

    A layer whose new moments are not finite keeps its total and counts the batch as skipped.

    Example (inside ``lax.scan``, with `bnjax.lifecycle.layer_input_moments` for linen):
      >>> from bnjax.lifecycle import layer_input_moments
      >>> model = nn.BatchNorm(use_running_average=True)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 1)))
      >>> batches = jnp.array([[[0.0], [2.0]], [[4.0], [6.0]]])     # two batches of two
      >>> def moments_of(batch):
      ...     return layer_input_moments(model, variables, batch)     # {(): Moments}
      >>> def body(totals, batch):
      ...     return accumulate(totals, moments_of(batch)), None
      >>> start = empty_totals(jax.eval_shape(moments_of, batches[0]))
      >>> totals, _ = jax.lax.scan(body, start, batches)
      >>> totals[()].moments.mean.tolist(), int(totals[()].batches)
      ([3.0], 2)
      >>> population_state(totals[()].moments).var.tolist()   # not the batches' 1.0
      [5.0]
    """
    merged = {}
    for key, total in totals.items():
        moments = new[key]
        finite = jnp.all(jnp.isfinite(moments.mean)) & jnp.all(jnp.isfinite(moments.m2))
        # The first batch with values in a channel fixes its shift: its own mean.
        started = total.shifted.count > 0
        shift = jnp.where(started | (moments.count == 0), total.shift, moments.mean)
        previous = total.shifted._replace(
            mean=total.shifted.mean + (total.shift - shift)  # 0 after the first batch
        )
        combined = merge_calls((previous, moments._replace(mean=moments.mean - shift)))
        keep = functools.partial(jnp.where, finite)
        merged[key] = Total(
            jax.tree.map(keep, combined, total.shifted),
            total.batches + finite.astype(jnp.int32),
            total.skipped + (~finite).astype(jnp.int32),
            keep(shift, total.shift),
        )
    return merged


def empty_totals(shapes: Mapping[Any, stats.Moments]) -> dict:
    """Zero totals (the neutral element of `accumulate`) for moments of these shapes, e.g.
    ``empty_totals(jax.eval_shape(layer_input_moments, model, variables, batch))``.

    Example:
      >>> shapes = {"bn": jax.eval_shape(lambda: bnjax.Moments(*[jnp.ones(3)] * 3))}
      >>> empty_totals(shapes)["bn"].moments.m2.tolist()
      [0.0, 0.0, 0.0]
    """
    zero = jnp.zeros((), jnp.int32)
    return {
        key: Total(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), moments),
            zero,
            zero,
            jnp.zeros(moments.mean.shape, moments.mean.dtype),
        )
        for key, moments in shapes.items()
    }


def population(moments: stats.Moments, old_mean, old_var, unbiased: bool):
    """(mean, var) from moments; channels without enough values keep the old statistics."""
    ddof = 1 if unbiased else 0
    usable = moments.count > ddof
    var = moments.m2 / jnp.maximum(moments.count - ddof, 1)
    old_mean, old_var = jnp.asarray(old_mean), jnp.asarray(old_var)
    return (
        jnp.where(usable, moments.mean, old_mean).astype(old_mean.dtype),
        jnp.where(usable, var, old_var).astype(old_var.dtype),
    )


def population_state(
    moments: stats.Moments,
    state: BatchNormState | BatchRenormState | None = None,
    *,
    unbiased: bool = False,
    batches=None,
    skipped=None,
):
    """A batch-norm state holding the statistics summarised by `moments` (pure, jittable).

    Args:
      moments: per-feature `Moments` of a layer's inputs (e.g. merged over a data set).
      state: the state to update (its dtype and, for BatchRenormState, its renorm statistics
        and step; an EvoNormB0State gets its variance only); None starts from
        ``batch_norm_state(moments.mean.shape)``.
      unbiased: store ``m2 / (n - 1)`` instead of ``m2 / n``, as the layer is configured.
      batches, skipped: the new counters (None keeps the state's).

    Features with no value (or one, when unbiased) keep the state's statistics.

    Example:
      >>> from bnjax.lifecycle.layers import feature_moments
      >>> x = jnp.array([[0.0], [2.0], [4.0], [6.0]])      # two batches of two
      >>> totals = {"bn": Total(feature_moments(x[:2], -1), 1, 0)}
      >>> totals = accumulate(totals, {"bn": feature_moments(x[2:], -1)})
      >>> population_state(totals["bn"].moments).var.tolist()  # batch variances are 1 and 1
      [5.0]
    """
    if state is None:
        state = batch_norm_state(tuple(moments.mean.shape))
    if isinstance(state, EvoNormB0State):  # a running variance only
        updates = dict(var=population(moments, state.var, state.var, unbiased)[1])
    else:
        mean, var = population(moments, state.mean, state.var, unbiased)
        updates = dict(mean=mean, var=var)
    if isinstance(state, BatchRenormState):
        renorm = population(moments, state.renorm_mean, state.renorm_var, False)
        updates.update(renorm_mean=renorm[0], renorm_var=renorm[1])
    if batches is not None:
        updates["count"] = jnp.asarray(batches, jnp.int32)
    if skipped is not None:
        updates["skipped"] = jnp.asarray(skipped, jnp.int32)
    return state._replace(**updates)
