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

One function per kind of model, each with the keywords that apply to it:

    variables = recalibrate(linen_model, variables, batches, apply_kwargs={"train": False})
    model = recalibrate_nnx(nnx_model, batches)                   # updated in place
    states = recalibrate_states(layer_inputs, states, batches)    # the functional core

Why three functions and not one that looks at its first argument: the three take different
things (linen variables beside a stateless module; an nnx model that holds its own state; a
function and a pytree of states) and give back different things (new variables, the same
model, new states), and each has options that mean nothing to the others (`apply_kwargs` and
`rngs` feed ``model.apply``; `forward` calls an nnx model; `unbiased` is for states, since the
modules say themselves whether they store the unbiased variance). One signature each lets a
reader, an IDE and a type checker see what a call takes and returns, and a wrong option fails
as an unknown keyword instead of being ignored; a model given to the wrong function is
refused with the call to make instead. They share everything else: `mode`, `num_batches`,
`axis_name`, `jit`, `progress`, and the loop (`bnjax.lifecycle._recalibration_loop`). The
linen function keeps the short name because linen is what the bundled models, the training
application and the study use, so their calls stay as they were.

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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from bnjax.lifecycle._backends import (
    Functional,
    Linen,
    Nnx,
    layer_input_moments,
)
from bnjax.lifecycle._recalibration_loop import run_passes

__all__ = ["layer_input_moments", "recalibrate", "recalibrate_nnx", "recalibrate_states"]


def recalibrate(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable,
    *,
    mode: str = "train",
    num_batches: int | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    axis_name=None,
    jit: bool = True,
    progress: bool = False,
) -> dict:
    """Sets every batch norm of a linen model to exact population statistics.

    Each batch norm's ``mean`` and ``var`` in ``variables["batch_stats"]`` (shape: the
    layer's features, (C,) for features last) become the mean and variance of everything
    that reaches the layer over `batches` (see the module docstring for the two modes);
    biased, or unbiased where the layer has ``use_unbiased_running_var=True``. For an nnx
    model use `recalibrate_nnx`, for the functional core `recalibrate_states`.

    Args:
      model: a ``flax.linen.Module`` with bnjax or flax batch norms.
      variables: its variables from ``model.init``, with a ``"batch_stats"`` collection.
      batches: an iterable (a list, a generator) of model inputs, one batch each: an
        array of shape (N, ...) for N examples, or a tuple of such positional arguments. Map
        your data to inputs first, e.g. ``(b["image"] for b in dataset)``. With `axis_name`
        every array has a leading device axis, (D, N / D, ...) for D devices.
      mode: "train" (one pass, batch statistics as in training) or "full_batch".
      num_batches: use at most this many batches (a positive int; None: all of them).
      apply_kwargs: extra ``model.apply`` keywords, e.g. ``{"train": False}`` (the batch
        norms are switched by the interceptor, whatever this says).
      rngs: ``{name: key}`` for ``model.apply`` (e.g. dropout); batch i uses
        ``fold_in(key, i)``.
      axis_name: `jax.pmap` each batch over its leading (device) axis under this name and
        merge the statistics of all devices (modules with this `axis_name` synchronise too).
      jit: compile the per-batch step (False to debug).
      progress: show a progress bar on stderr.

    Returns:
      New variables, `variables`' structure: "batch_stats" recalibrated (the counters
      'count', 'skipped' where kept: batches merged, batches left out), the rest unchanged.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 3.0 + 1.0
      >>> variables = model.init(jax.random.key(1), x[:2], train=False)
      >>> batches = [x[:32], x[32:]]
      >>> variables = recalibrate(model, variables, batches, apply_kwargs={"train": False})
      >>> bn_input = x @ variables["params"]["dense0"]["kernel"]          # what reaches norm0
      >>> bool(jnp.allclose(variables["batch_stats"]["norm0"]["var"], bn_input.var(0), rtol=1e-4))
      True
      >>> variables["batch_stats"]["norm0"]["var"].shape
      (4,)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(_wrong_front_end(model, "model", "a linen Module"))
    backend = Linen(model, variables, apply_kwargs, rngs, axis_name)
    return run_passes(
        backend,
        variables,
        batches,
        mode=mode,
        num_batches=num_batches,
        axis_name=axis_name,
        jit=jit,
        progress=progress,
    )


def recalibrate_nnx(
    model: nnx.Module,
    batches: Iterable,
    *,
    mode: str = "train",
    num_batches: int | None = None,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
    axis_name=None,
    jit: bool = True,
    progress: bool = False,
) -> nnx.Module:
    """Sets every batch norm of an nnx model, in place, to exact population statistics.

    As `recalibrate`, for a model that holds its own state: each batch norm's ``mean`` and
    ``var`` (shape: its features, (C,)) become those of its inputs over `batches`; biased, or
    unbiased where the layer has ``use_unbiased_running_var=True``. The batch norms are
    switched to the `mode`'s statistics; the other layers keep the model's mode (call
    ``model.eval()`` first: dropout off, which would otherwise inflate the variances).

    Args:
      model: an ``nnx.Module`` with bnjax or flax nnx batch norms.
      batches: an iterable (a list, a generator) of model inputs, one batch each: an
        array of shape (N, ...) for N examples, or a tuple of such positional arguments. Map
        your data to inputs first, e.g. ``(b["image"] for b in dataset)``. With `axis_name`
        every array has a leading device axis, (D, N / D, ...) for D devices.
      mode: "train" (one pass, batch statistics as in training) or "full_batch".
      num_batches: use at most this many batches (a positive int; None: all of them).
      forward: ``forward(model, batch)`` runs the model on one batch (its result is not
        used); default ``model(batch)``, or ``model(*batch)`` for a tuple.
      axis_name: `jax.pmap` each batch over its leading (device) axis under this name and
        merge the statistics of all devices.
      jit: compile the per-batch step (False to debug).
      progress: show a progress bar on stderr.

    Returns:
      `model` itself, updated (the counters 'count', 'skipped' too, where the layer has them).

    Example:
      >>> model = nnx.Sequential(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
      >>> model = recalibrate_nnx(model, [x[:2], x[2:]])           # two batches of two
      >>> model.layers[0].mean[...].tolist(), model.layers[0].var[...].tolist()
      ([3.0, 4.0], [5.0, 5.0])
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(_wrong_front_end(model, "model", "an nnx Module"))
    backend = Nnx(model, forward, axis_name)
    state = run_passes(
        backend,
        backend.state,
        batches,
        mode=mode,
        num_batches=num_batches,
        axis_name=axis_name,
        jit=jit,
        progress=progress,
    )
    nnx.update(model, state)
    return model


def recalibrate_states(
    layer_inputs: Callable[[Any, Any, bool], Any],
    states,
    batches: Iterable,
    *,
    mode: str = "train",
    num_batches: int | None = None,
    unbiased: bool = False,
    axis_name=None,
    jit: bool = True,
    progress: bool = False,
):
    """Sets the functional core's batch-norm states to exact population statistics.

    `states` is any pytree holding `bnjax.BatchNormState` / `BatchRenormState` leaves (with
    other leaves left alone); each state's ``mean`` and ``var`` (shape: its features, (C,))
    become those of its layer's inputs over `batches`.

    Args:
      layer_inputs: ``layer_inputs(states, batch, training) -> inputs`` runs your network on
        one batch with ``bnjax.batch_norm(..., training=training)`` and returns `states`'
        structure with each state replaced by its layer's input: an array of shape
        (..., C), features last; a `LayerInput` (x, its feature axis or axes, a mask); or
        None for a layer this batch does not reach. Pure and jittable.
      states: the pytree of states, e.g. ``{"bn": bnjax.batch_norm_state(C)}``.
      batches: an iterable (a list, a generator) of model inputs, one batch each: an
        array of shape (N, ...) for N examples, or a tuple of such positional arguments. Map
        your data to inputs first, e.g. ``(b["image"] for b in dataset)``. With `axis_name`
        every array has a leading device axis, (D, N / D, ...) for D devices.
      mode: "train" (one pass, ``training=True`` as in training) or "full_batch".
      num_batches: use at most this many batches (a positive int; None: all of them).
      unbiased: store the unbiased variance (divided by n - 1), as a layer with
        ``use_unbiased_running_var=True`` would; default the biased one (by n).
      axis_name: `jax.pmap` each batch over its leading (device) axis under this name and
        merge the statistics of all devices.
      jit: compile the per-batch step (False to debug).
      progress: show a progress bar on stderr.

    Returns:
      New states, `states`' structure (the counters 'count' and 'skipped': batches merged,
      batches left out).

    Example:
      >>> def layer_inputs(states, batch, training):
      ...     return {"bn": batch}                  # one batch norm, fed the batch itself
      >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
      >>> states = {"bn": bnjax.batch_norm_state(2)}
      >>> states = recalibrate_states(layer_inputs, states, [x[:2], x[2:]], unbiased=True)
      >>> [round(v, 4) for v in states["bn"].var.tolist()], int(states["bn"].count)
      ([6.6667, 6.6667], 2)
    """
    if isinstance(layer_inputs, (nn.Module, nnx.Module)) or not callable(layer_inputs):
        raise TypeError(_wrong_front_end(layer_inputs, "layer_inputs", "a function"))
    backend = Functional(layer_inputs, states, unbiased, axis_name)
    return run_passes(
        backend,
        states,
        batches,
        mode=mode,
        num_batches=num_batches,
        axis_name=axis_name,
        jit=jit,
        progress=progress,
    )


def _wrong_front_end(value, argument: str, expected: str) -> str:
    """The error for a model given to the wrong front end: what to call instead."""
    if isinstance(value, nnx.Module):
        right = "recalibrate_nnx(model, batches, ...)"
    elif isinstance(value, nn.Module):
        right = "recalibrate(model, variables, batches, ...)"
    elif callable(value):
        right = "recalibrate_states(layer_inputs, states, batches, ...)"
    else:
        return f"`{argument}` must be {expected}, got {type(value).__name__}."
    return f"`{argument}` must be {expected}, got {type(value).__name__}: call {right} instead."
