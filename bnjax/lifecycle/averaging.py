"""Averaged models (EMA, SWA) whose batch statistics belong to the averaged weights.

An exponential moving average of the weights (EMA, Polyak averaging; optax's `ema`) or an
equal-weight average of snapshots (SWA, Izmailov et al. 2018) is a network nobody trained:
its batch norms see inputs that no training step produced. The running statistics of the
training model belong to the latest weights; an average of them over the snapshots
(``timm``'s habit) belongs to none of the averaged weights either, since a layer's input
moments are not linear in the weights before it. Two ways to give the averaged model
statistics, chosen by `averaged_variables`:

- ``statistics="average"``: the floating batch statistics averaged alongside the weights
  (free, no data; close when the weights move little over the averaging window);
- ``statistics="recalibrate"``: exact population statistics of the averaged weights on a few
  batches (`bnjax.lifecycle.recalibrate`; PyTorch's ``swa_utils.update_bn``), which is what
  the averaged model's batch norms should hold.

The averagers are optax-style pairs of pure functions over linen variables:

    averager = ema(0.999)                      # or swa(every=10)
    average = averager.init(variables)         # AveragedState(params, batch_stats, count, step)
    average = averager.update(average, variables)        # each step; jittable
    eval_variables = averaged_variables(model, average, statistics="recalibrate",
                                        batches=batches)

For nnx, average ``nnx_variables(model)`` (its ``nnx.Param`` and ``nnx.BatchStat`` state) and
get the averaged model back with ``averaged_nnx(model, average, ...)`` (a copy; the model is
left as it is; "recalibrate" through `bnjax.lifecycle.recalibrate_nnx`).

EMA, decay d in [0, 1), starting from the variables given to `init`:

    avg_t = d_t * avg_{t-1} + (1 - d_t) * w_t,   d_t = d, or with ``warmup=True``
    d_t = min(d, (1 + t) / (10 + t)) for the t-th update (t = 0, 1, ...)

(the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` and torch-ema's
``use_num_updates``: early averages forget the initialisation quickly; optax's zero-started,
``1 - d^t``-debiased `ema` is a different rule and is not used, since this average starts from
real weights). SWA, the mean of the snapshots folded in:

    avg_n = avg_{n-1} + (w - avg_{n-1}) / n    (n = snapshots so far)

folding in the variables of every `every`-th update (the 1st snapshot replaces the initial
copy, as in PyTorch's ``AveragedModel``). Both blend with `optax.incremental_update`.

Integer leaves of the batch statistics (bnjax's counters 'count' and 'skipped', batch
renorm's 'step') are not averaged: the average keeps the latest values, so the counters still
say how many batches the statistics saw (`recalibrate` sets them to the batches it merged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bnjax.lifecycle.recalibration import recalibrate, recalibrate_nnx

__all__ = [
    "STATISTICS",
    "AveragedState",
    "Averager",
    "averaged_nnx",
    "averaged_variables",
    "ema",
    "nnx_variables",
    "swa",
]

STATISTICS = ("average", "recalibrate")
"""The values of `averaged_variables`' `statistics`."""


class AveragedState(NamedTuple):
    """The averaged copy of a model's variables.

    params: the averaged parameters (the tree of ``variables["params"]``).
    batch_stats: the batch statistics, floating leaves averaged alongside the parameters and
      integer counters the latest (the tree of ``variables["batch_stats"]``); None for a
      model without them.
    count: int32 scalar, the updates (EMA) or snapshots (SWA) folded in so far.
    step: int32 scalar, the calls to ``update`` so far (SWA folds in every `every`-th).

    Example:
      >>> average = swa(every=2).init({"params": {"w": jnp.zeros(3)}, "batch_stats": {}})
      >>> average.params["w"].shape, int(average.count), int(average.step)
      ((3,), 0, 0)
    """

    params: Any
    batch_stats: Any
    count: jax.Array
    step: jax.Array


class Averager(NamedTuple):
    """``init(variables) -> AveragedState`` and ``update(average, variables) -> AveragedState``
    (pure, jittable), as made by `ema` and `swa`.

    Example:
      >>> averager = ema(0.9)
      >>> update = jax.jit(averager.update)
      >>> average = averager.init({"params": {"w": jnp.ones(2)}})
      >>> average = update(average, {"params": {"w": jnp.zeros(2)}})
      >>> [round(v, 4) for v in average.params["w"].tolist()]
      [0.9, 0.9]
    """

    init: Callable[[Mapping[str, Any]], AveragedState]
    update: Callable[[AveragedState, Mapping[str, Any]], AveragedState]


def _init(variables: Mapping[str, Any]) -> AveragedState:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "`variables` must be linen variables, a mapping with 'params' (and 'batch_stats' "
            f"for batch norms), got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
            + "."
        )
    # Copies, so that the average never aliases (or, under donation, loses) the model's arrays.
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    stats = variables.get("batch_stats")
    return AveragedState(
        params=copy(variables["params"]),
        batch_stats=None if stats is None else copy(stats),
        count=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def _blend(average, new, step_size):
    """`optax.incremental_update` (step_size * new + (1 - step_size) * average) on each
    floating leaf; integer leaves (counters) take the new value."""

    def leaf(old, latest):
        if not jnp.issubdtype(jnp.result_type(old), jnp.inexact):
            return jnp.asarray(latest)
        size = jnp.asarray(step_size, jnp.result_type(old))
        return optax.incremental_update(jnp.asarray(latest), old, size)

    return jax.tree.map(leaf, average, new)


def _check_matches(average: AveragedState, variables) -> None:
    if not isinstance(average, AveragedState):
        raise TypeError(
            f"`average` must be the AveragedState of `init`, got {type(average).__name__}."
        )
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("`variables` must be linen variables, a mapping with 'params'.")
    has_stats = variables.get("batch_stats") is not None
    if has_stats != (average.batch_stats is not None):
        raise ValueError(
            "`variables` and `average` disagree on 'batch_stats' (one has them, the other "
            "not): pass the same model's variables as to `init`."
        )


def _fold_in(average: AveragedState, variables, step_size, take) -> AveragedState:
    """The average with `variables` blended in at `step_size` where `take` (a bool scalar)."""
    params = _blend(average.params, variables["params"], step_size)
    stats = average.batch_stats
    if stats is not None:
        stats = _blend(stats, variables["batch_stats"], step_size)
    new = AveragedState(params, stats, average.count + 1, average.step + 1)
    skipped = average._replace(step=average.step + 1)
    return optax.tree_utils.tree_where(take, new, skipped)


def ema(decay: float, *, warmup: bool = False) -> Averager:
    """An exponential moving average of the weights and batch statistics (module docstring).

    Args:
      decay: d in [0, 1), the weight of the old average (0.999 keeps about the last 1000
        steps; 0 copies the latest variables).
      warmup: use d_t = min(d, (1 + t) / (10 + t)) for the t-th update (t from 0).

    Example:
      >>> averager = ema(0.5)
      >>> average = averager.init({"params": {"w": jnp.array([0.0])}})
      >>> average = averager.update(average, {"params": {"w": jnp.array([4.0])}})
      >>> average.params["w"].tolist(), int(average.count)
      ([2.0], 1)
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(
            f"`decay`={decay!r} must be a number in [0, 1): the weight of the old average "
            "(e.g. 0.999; 0 copies the latest weights)."
        )

    def update(average: AveragedState, variables) -> AveragedState:
        _check_matches(average, variables)
        rate = jnp.float32(decay)
        if warmup:
            t = average.count.astype(jnp.float32)
            rate = jnp.minimum(rate, (1.0 + t) / (10.0 + t))
        return _fold_in(average, variables, 1.0 - rate, jnp.bool_(True))

    return Averager(_init, update)


def swa(*, every: int = 1) -> Averager:
    """Stochastic weight averaging: the equal-weight mean of every `every`-th update's
    variables (module docstring); the first snapshot replaces the copy made by `init`.

    Args:
      every: fold in the variables of updates every, 2 * every, ... (a positive int; e.g.
        once per epoch of `every` steps).

    Example:
      >>> averager = swa(every=2)
      >>> average = averager.init({"params": {"w": jnp.array([0.0])}})
      >>> for w in [1.0, 2.0, 3.0, 4.0]:
      ...     average = averager.update(average, {"params": {"w": jnp.array([w])}})
      >>> average.params["w"].tolist(), int(average.count)   # the mean of 2 and 4
      ([3.0], 2)
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"`every`={every!r} must be a positive int (updates per snapshot).")

    def update(average: AveragedState, variables) -> AveragedState:
        _check_matches(average, variables)
        take = (average.step + 1) % every == 0
        step_size = 1.0 / (average.count + 1).astype(jnp.float32)
        return _fold_in(average, variables, step_size, take)

    return Averager(_init, update)


def _averaged(average, statistics: str) -> dict:
    """The average's variables ({"params", "batch_stats"}), after checking the arguments:
    `statistics` known, and statistics to recalibrate where "recalibrate" asks for it."""
    if not isinstance(average, AveragedState):
        raise TypeError(
            f"`average` must be an AveragedState (from ema(...).init / swa(...).init), got "
            f"{type(average).__name__}."
        )
    if statistics not in STATISTICS:
        raise ValueError(f"`statistics`={statistics!r} must be one of {STATISTICS}.")
    variables = {"params": average.params}
    if average.batch_stats is not None:
        variables["batch_stats"] = average.batch_stats
    elif statistics == "recalibrate":
        raise ValueError(
            "`statistics`='recalibrate': the averaged model has no batch statistics (no "
            "'batch_stats' in the variables given to `init`); use statistics='average', "
            "which returns its parameters."
        )
    return variables


def _check_batches(batches) -> None:
    if batches is None:
        raise ValueError(
            "`statistics`='recalibrate' needs `batches`: a few batches of model inputs (e.g. "
            "[b['image'] for b in training batches]); or use statistics='average'."
        )


def averaged_variables(
    model: nn.Module | None,
    average: AveragedState,
    *,
    statistics: str = "average",
    batches: Iterable | None = None,
    mode: str = "train",
    num_batches: int | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    axis_name=None,
    jit: bool = True,
) -> dict:
    """Linen variables of the averaged model, ready for ``model.apply(..., train=False)``.

    Args:
      model: the linen model (used by "recalibrate"; may be None for "average").
      average: the `AveragedState` of an `ema` or `swa` averager.
      statistics: "average": the batch statistics averaged alongside the weights (no data);
        "recalibrate": exact population statistics of the averaged weights over `batches`
        (`bnjax.lifecycle.recalibrate`; the counters become the batches merged).
      batches, mode, num_batches, apply_kwargs, rngs, axis_name, jit: as in `recalibrate`
        (`batches` required for "recalibrate"; `apply_kwargs` defaults to ``{"train":
        False}`` for the bundled models).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` ('batch_stats' absent for a model without
      batch norms, where `statistics` does not matter).

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> variables = model.init(jax.random.key(1), x[:2], train=False)
      >>> average = ema(0.9).init(variables)
      >>> fresh = averaged_variables(model, average, statistics="recalibrate", batches=[x])
      >>> bn_input = x @ fresh["params"]["dense0"]["kernel"]
      >>> bool(jnp.allclose(fresh["batch_stats"]["norm0"]["var"], bn_input.var(0), rtol=1e-4))
      True
    """
    variables = _averaged(average, statistics)
    if statistics == "average" or "batch_stats" not in variables:
        return variables
    _check_batches(batches)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`statistics`='recalibrate' needs the linen `model`, got {type(model).__name__}."
        )
    return recalibrate(
        model,
        variables,
        batches,
        mode=mode,
        num_batches=num_batches,
        apply_kwargs={"train": False} if apply_kwargs is None else apply_kwargs,
        rngs=rngs,
        axis_name=axis_name,
        jit=jit,
    )


def nnx_variables(model: nnx.Module) -> dict:
    """An nnx model's variables in the form the averagers take: ``{"params": its nnx.Param
    state, "batch_stats": its nnx.BatchStat state}`` ('batch_stats' absent when it has none).

    Example:
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=rngs), nnx.BatchNorm(2, rngs=rngs))
      >>> sorted(nnx_variables(model))
      ['batch_stats', 'params']
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx Module, got {type(model).__name__}.")
    variables = {"params": nnx.state(model, nnx.Param)}
    stats = nnx.state(model, nnx.BatchStat)
    if jax.tree.leaves(stats):
        variables["batch_stats"] = stats
    return variables


def averaged_nnx(
    model: nnx.Module,
    average: AveragedState,
    *,
    statistics: str = "average",
    batches: Iterable | None = None,
    mode: str = "train",
    num_batches: int | None = None,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    axis_name=None,
    jit: bool = True,
) -> nnx.Module:
    """A copy of the nnx `model` holding the averaged parameters and, as `statistics` says,
    the averaged batch statistics or exact population statistics of the averaged weights
    (`recalibrate_nnx` over `batches`; the other options as there). `average` is from an
    averager's ``init(nnx_variables(model))``. `model` itself is left unchanged.

    Example:
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=rngs), nnx.BatchNorm(2, rngs=rngs))
      >>> averager = ema(0.9)
      >>> average = averager.update(averager.init(nnx_variables(model)), nnx_variables(model))
      >>> x = jax.random.normal(jax.random.key(0), (32, 3))
      >>> averaged = averaged_nnx(model, average, statistics="recalibrate", batches=[x])
      >>> bn_input = averaged.layers[0](x)
      >>> bool(jnp.allclose(averaged.layers[1].var[...], bn_input.var(0), rtol=1e-4))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx Module, got {type(model).__name__}.")
    variables = _averaged(average, statistics)
    copy = nnx.clone(model)
    nnx.update(copy, variables["params"])
    if "batch_stats" not in variables:
        return copy
    nnx.update(copy, variables["batch_stats"])
    if statistics == "average":
        return copy
    _check_batches(batches)
    return recalibrate_nnx(
        copy,
        batches,
        mode=mode,
        num_batches=num_batches,
        forward=forward,
        axis_name=axis_name,
        jit=jit,
    )
