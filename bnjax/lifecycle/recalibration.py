"""Precise batch norm: running statistics recomputed as exact population statistics.

A running average with momentum 0.99 remembers the last few hundred batches, weighted toward
the latest, and averages per-batch variances, which is not the variance of the data: the spread
of the batch means is missing (for i.i.d. batches of b values per channel the average biased
batch variance is ``(b - 1) / b`` of it; for sorted or class-grouped batches it can be far
off). `recalibrate` instead summarises every batch by its exact sufficient
statistics ``Moments(count, mean, m2)`` per channel and merges them exactly (Chan et al.):

    mean = sum_i x_i / n,     var = sum_i (x_i - mean)^2 / n   (or / (n - 1), see below)

over all n values that reach the layer (every example and spatial position of N batches,
masked values left out). The stored variance is biased, or unbiased where the layer stores the
unbiased one (`use_unbiased_running_var=True`), exactly as the layer itself would.

What "the values that reach the layer" are depends on the layers before it. Two modes:

- ``mode="train"`` (default; fvcore's PreciseBN): one pass, the network running as in training,
  so every batch norm normalizes with the statistics of the current batch, and each layer's
  inputs are those it sees during training. Cheap; what most practitioners mean.
- ``mode="full_batch"``: the statistics a training-mode pass would use if the whole data set
  were one batch. Then evaluation with the new statistics equals training mode on the whole
  data, layer after layer (up to float32 rounding). It is a fixpoint: each pass runs the network
  in evaluation mode with the statistics of the previous pass; a layer is exact once the layers
  before it are, so after at most L passes for L layers every layer holds the exact
  statistics (in practice depth + 2 passes: it stops once a pass changes nothing, bit for
  bit). The batches are kept in memory for the repeated passes.

Also test-time adaptation to a new domain (AdaBN, Li et al. 2016): recalibrate on target data.

Three front ends share the loop, chosen by the first argument:

    variables = recalibrate(linen_model, variables, batches, apply_kwargs={"train": False})
    model = recalibrate(nnx_model, batches)                       # updated in place
    states = recalibrate(layer_inputs, states, batches)           # the functional core

For linen the interceptor captures each batch norm's input and switches its mode itself, so
call the model as in evaluation (``apply_kwargs={"train": False}``: dropout off, which would
otherwise inflate the variances). For nnx the other layers keep the model's mode (call
``model.eval()`` first). For the functional core, ``layer_inputs(states, batch, training)``
runs your network with ``bnjax.batch_norm(..., training=training)`` and returns, in the
structure of `states`, each layer's input (an array with features last, or a `LayerInput`).

Each batch goes through one jitted function (or a `jax.pmap` over the leading axis of every
batch with ``axis_name=...``, merging the moments of all devices exactly; modules whose own
`axis_name` is that name then synchronise too). Under ``jax.jit`` with batches sharded over
devices the reductions are global by construction. A batch whose moments are not finite in a
layer is left out of that layer and counted in its 'skipped' counter. After recalibration the
counters hold count = batches merged, skipped = batches left out; BatchRenorm's 'renorm_mean'
and 'renorm_var' get the population statistics too (its 'step' is left alone).

References:
  Wu & Johnson (2021), Rethinking "Batch" in BatchNorm, arXiv:2105.07576 (precise BN).
  Li, Wang, Shi, Liu & Hou (2016), Revisiting Batch Normalization For Practical Domain
  Adaptation, arXiv:1603.04779 (AdaBN).
"""

from __future__ import annotations

import itertools
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnjax.lifecycle._backends import (
    MODES,
    Functional,
    Linen,
    Nnx,
    layer_input_moments,
)
from bnjax.lifecycle.layers import path_str
from bnjax.lifecycle.population import accumulate, empty_totals

__all__ = ["layer_input_moments", "recalibrate"]


def _progress(iterable, *, total, description: str, enabled: bool):
    if not enabled:
        return iterable
    from bnjax.progress import track

    return track(iterable, description, total=total, log=lambda line: print(line, file=sys.stderr))


def _one_pass(moments, step, check, current, batches, *, total, description, progress):
    totals = None
    for index, batch in enumerate(
        _progress(batches, total=total, description=description, enabled=progress)
    ):
        index = jnp.asarray(index, jnp.int32)
        if totals is None:
            shapes = jax.eval_shape(moments, current, batch, index)
            check(current, shapes)
            totals = empty_totals(shapes)
        totals = step(totals, current, batch, index)
    if totals is None:
        raise ValueError("`batches` gave no batch to recalibrate on.")
    return totals


def _make_step(backend, jit: bool, axis_name):
    """(moments, step): one batch's per-layer moments, and their accumulation into totals."""
    if axis_name is None:
        moments = backend.moments

        def step(totals, current, batch, index):
            return accumulate(totals, moments(current, batch, index))

        return moments, jax.jit(step) if jit else step
    mapped = jax.pmap(backend.moments, axis_name=axis_name, in_axes=(None, 0, None))

    def moments(current, batch, index):  # replicated over devices: keep one copy
        return jax.tree.map(lambda leaf: leaf[0], mapped(current, batch, index))

    merge = jax.jit(accumulate) if jit else accumulate
    return moments, lambda totals, current, batch, index: merge(
        totals, moments(current, batch, index)
    )


def _same(a: dict, b: dict) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for key in a
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True)
    )


def recalibrate(
    model,
    *data,
    mode: str = "train",
    num_batches: int | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    forward: Callable | None = None,
    unbiased: bool = False,
    axis_name=None,
    jit: bool = True,
    progress: bool = False,
):
    """Sets every batch norm's running statistics to exact population statistics.

    Forms (see the module docstring for the two `mode`s and what they compute):

      recalibrate(linen_model, variables, batches, apply_kwargs=..., rngs=...) -> variables
      recalibrate(nnx_model, batches, forward=...) -> nnx_model (updated in place)
      recalibrate(layer_inputs, states, batches, unbiased=...) -> states

    Args:
      model: a ``flax.linen.Module``, an ``nnx.Module``, or for the functional core a function
        ``layer_inputs(states, batch, training) -> inputs`` (inputs: `states`' structure with
        each state replaced by its layer's input array, a `LayerInput`, or None if unused).
      data: (variables, batches) for linen, (batches,) for nnx, (states, batches) otherwise.
        `batches` is an iterable of model inputs (an array, or a tuple of positional
        arguments); map your data to inputs first, e.g. ``(b["image"] for b in dataset)``.
      mode: "train" (one pass, batch statistics as in training) or "full_batch".
      num_batches: use at most this many batches (a positive int; None: all of them).
      apply_kwargs: linen: extra ``model.apply`` keywords, e.g. ``{"train": False}``.
      rngs: linen: {name: key} for ``apply``; batch i uses ``fold_in(key, i)``.
      forward: nnx: ``forward(model, batch)`` (default ``model(batch)``).
      unbiased: functional: store the unbiased variance (linen and nnx read each layer's
        `use_unbiased_running_var`).
      axis_name: `jax.pmap` each batch over its leading (device) axis under this name and merge
        the statistics of all devices.
      jit: compile the per-batch step (False to debug).
      progress: show a progress bar on stderr.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 3.0 + 1.0
      >>> variables = model.init(jax.random.key(1), x[:2], train=False)
      >>> variables = recalibrate(model, variables, [x[:32], x[32:]], apply_kwargs={"train": False})
      >>> bn_input = x @ variables["params"]["dense0"]["kernel"]          # what reaches norm0
      >>> bool(jnp.allclose(variables["batch_stats"]["norm0"]["var"], bn_input.var(0), rtol=1e-4))
      True
      >>> variables["batch_stats"]["norm0"]["var"].shape
      (4,)
    """
    if mode not in MODES:
        raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
    if num_batches is not None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
            raise TypeError(
                f"`num_batches` must be a positive int or None (all batches), got "
                f"{type(num_batches).__name__} {num_batches!r}."
            )
        if num_batches < 1:
            raise ValueError(
                f"`num_batches` must be >= 1 (or None for all batches), got {num_batches}."
            )
        num_batches = int(num_batches)
    if isinstance(model, nnx.Module):
        if len(data) != 1:
            raise TypeError("For an nnx model call recalibrate(model, batches, ...).")
        backend, batches = Nnx(model, forward, axis_name), data[0]
        current = backend.state
    elif isinstance(model, nn.Module):
        if len(data) != 2:
            raise TypeError("For a linen model call recalibrate(model, variables, batches, ...).")
        current, batches = data
        backend = Linen(model, current, apply_kwargs, rngs, axis_name)
    elif callable(model):
        if len(data) != 2:
            raise TypeError(
                "For the functional core call recalibrate(layer_inputs, states, batches)."
            )
        current, batches = data
        backend = Functional(model, current, unbiased, axis_name)
    else:
        raise TypeError(f"`model` must be a linen or nnx Module or a function, got {type(model)}.")
    backend.mode = mode
    try:
        iter(batches)
    except TypeError:
        raise TypeError(
            f"`batches` must be an iterable of model inputs (a list of arrays, a generator), "
            f"got {type(batches).__name__}."
        ) from None
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if num_batches is None else min(num_batches, len(batches))
    batches = itertools.islice(batches, num_batches)
    moments, step = _make_step(backend, jit, axis_name)

    def run(current, batches, description):
        return _one_pass(
            moments,
            step,
            backend.check,
            current,
            batches,
            total=total,
            description=description,
            progress=progress,
        )

    if mode == "train":
        totals = run(current, batches, "recalibrating")
        result = backend.write(current, totals, final=True)
    else:
        batches = list(batches)
        total = len(batches)
        totals = run(current, batches, "recalibrating, pass 1")
        for number in range(2, len(totals) + 1):
            following = backend.write(current, totals, final=False)
            next_totals = run(following, batches, f"recalibrating, pass {number}")
            settled = _same(
                backend.statistics(backend.write(following, next_totals, final=False)),
                backend.statistics(following),
            )
            current, totals = following, next_totals
            if settled:
                break
        result = backend.write(current, totals, final=True)
    _warn_about(backend, totals)
    if isinstance(backend, Nnx):
        nnx.update(model, result)
        return model
    return result


def _warn_about(backend, totals) -> None:
    unseen = [key for key in backend.all_layers if key not in totals]
    if unseen:
        warnings.warn(
            f"recalibrate: {len(unseen)} batch-norm layer(s) were never called and keep their "
            f"statistics: {[path_str(k) if isinstance(k, tuple) else k for k in unseen]}",
            stacklevel=3,
        )
    empty = [key for key, total in totals.items() if not bool(jnp.all(total.moments.count > 0))]
    if empty:
        warnings.warn(
            f"recalibrate: layer(s) {empty} saw no valid value in some channel (all batches "
            f"masked or non-finite); those channels keep their statistics.",
            stacklevel=3,
        )
