"""Per-layer batch-norm telemetry: batch statistics, their drift from the running ones, skips.

For every batch-norm call, from the layer's input x and its running statistics (before this
batch's update), per channel c:

    mu_B, var_B       mean and biased variance of the batch (masked values left out)
    mean_shift_c  = |mu_B - mu| / sqrt(var + eps)              (in running standard deviations)
    scale_shift_c = |log((var_B + eps) / (var + eps))| / 2      (= |log(sigma_B / sigma)|)
    drift_c       = mean_shift_c + scale_shift_c

and a `LayerTelemetry` of scalars: channel means of |mu_B|, var_B, |mu|, var, of the two shifts
and of drift, the largest drift_c, the number of channels whose batch statistics are not
finite, and the layer's counters (count and skipped; -1 when it keeps none). drift is 0 when
the batch looks exactly like the running statistics; during training it measures how far the
statistics the network trains with are from those it is evaluated with, and in evaluation it
flags a batch from a shifted distribution (then recalibrate, see `bnjax.lifecycle`).

Nothing here breaks purity: the numbers are computed inside the traced forward pass and leave it
as an ordinary output, a flax collection (`sow`), so they work under ``jit``/``pmap``.

    with diagnostics.telemetry():                     # linen, inside your (jitted) step
        logits, updates = model.apply(variables, x, train=True,
                                      mutable=["batch_stats", "bn_telemetry"])
    metrics = diagnostics.summaries(updates["bn_telemetry"])   # {"bn/stem_norm/drift": ...}

    logits, per_layer = diagnostics.collect(model, variables, x, train=False)   # linen
    y, per_layer = diagnostics.collect(nnx_model, x)                              # nnx
    telemetry = diagnostics.layer_telemetry(x, state, axis=-1)                    # functional
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from bnjax.core import BatchNormState
from bnjax.lifecycle.layers import (
    STATS,
    Path,
    call_parent,
    feature_moments,
    is_linen_batch_norm_call,
    is_linen_conv_norm_call,
    nnx_batch_norms,
    path_str,
    read_variable,
    subclass,
    swapped_classes,
    to_dict,
)

__all__ = ["COLLECTION", "LayerTelemetry", "collect", "layer_telemetry", "summaries", "telemetry"]

COLLECTION = "bn_telemetry"
"""The flax collection (and nnx sow name) the telemetry goes to."""


class LayerTelemetry(NamedTuple):
    """Scalar summaries of one batch-norm call (see the module docstring for the formulas).

    Example:
      >>> t = layer_telemetry(jnp.array([[1.0], [3.0]]), bnjax.batch_norm_state(1))
      >>> float(t.batch_mean_abs), float(t.running_var), int(t.nonfinite), int(t.count)
      (2.0, 1.0, 0, 0)
    """

    batch_mean_abs: jax.Array
    batch_var: jax.Array
    running_mean_abs: jax.Array
    running_var: jax.Array
    mean_shift: jax.Array
    scale_shift: jax.Array
    drift: jax.Array
    max_drift: jax.Array
    nonfinite: jax.Array
    count: jax.Array
    skipped: jax.Array


def layer_telemetry(
    x,
    state: BatchNormState,
    *,
    axis=-1,
    epsilon: float = 1e-5,
    mask=None,
    counters: tuple | None = None,
) -> LayerTelemetry:
    """Telemetry of one batch-norm input `x` against running statistics (pure, jittable).

    Args:
      x: the layer's input; `axis` its feature axis (or axes), as for `bnjax.batch_norm`.
      state: the running statistics (a `BatchNormState`, or anything with .mean and .var).
      epsilon: the layer's. mask: broadcastable to x by NumPy rules, as in the modules (a
        per-example mask is ``mask.reshape(N, 1, ..., 1)``); False entries left out.
      counters: (count, skipped) to report; default the state's (-1 if it has none).

    Example:
      >>> x = jnp.array([[1.0], [3.0]])                  # batch mean 2, variance 1
      >>> t = layer_telemetry(x, bnjax.batch_norm_state(1), epsilon=0.0)
      >>> float(t.mean_shift), float(t.scale_shift), float(t.drift)
      (2.0, 0.0, 2.0)
    """
    moments = feature_moments(x, axis, mask)
    batch_mean, batch_var = moments.mean, moments.variance()
    mean = jnp.asarray(state.mean, batch_mean.dtype)
    var = jnp.asarray(state.var, batch_mean.dtype)
    mean_shift = jnp.abs(batch_mean - mean) * jax.lax.rsqrt(var + epsilon)
    scale_shift = 0.5 * jnp.abs(jnp.log((batch_var + epsilon) / (var + epsilon)))
    drift = mean_shift + scale_shift
    if counters is None:
        counters = (getattr(state, "count", -1), getattr(state, "skipped", -1))
    return LayerTelemetry(
        batch_mean_abs=jnp.mean(jnp.abs(batch_mean)),
        batch_var=jnp.mean(batch_var),
        running_mean_abs=jnp.mean(jnp.abs(mean)),
        running_var=jnp.mean(var),
        mean_shift=jnp.mean(mean_shift),
        scale_shift=jnp.mean(scale_shift),
        drift=jnp.mean(drift),
        max_drift=jnp.max(drift),
        nonfinite=jnp.sum(~(jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)), dtype=jnp.int32),
        count=jnp.asarray(counters[0], jnp.int32),
        skipped=jnp.asarray(counters[1], jnp.int32),
    )


def _counters(read) -> tuple:
    return tuple(-1 if value is None else value for value in (read("count"), read("skipped")))


# --------------------------------------------------------------------------- linen


@contextlib.contextmanager
def telemetry(collection: str = COLLECTION):
    """Within this context, every linen batch-norm call sows its `LayerTelemetry`.

    It goes to `collection` at the module's path (a tuple, one entry per call) when that
    collection is mutable in the ``apply``; otherwise nothing is recorded and nothing changes.

    Example:
      >>> from bnjax import linen as bnn
      >>> model = bnn.BatchNorm(use_running_average=False)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> with telemetry():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats", COLLECTION])
      >>> (layer,) = updates[COLLECTION]["telemetry"]             # one call of the root layer
      >>> round(float(layer.mean_shift), 4)                      # |2 - 0| / sqrt(1 + 1e-5)
      2.0
    """

    def interceptor(next_fun, args, kwargs, context):
        owns_conv = is_linen_conv_norm_call(context)  # its statistics: of its conv's output
        if not (is_linen_batch_norm_call(context) or owns_conv):
            return next_fun(*args, **kwargs)
        module = context.module
        if not module.is_mutable_collection(collection) or module.is_initializing():
            return next_fun(*args, **kwargs)
        running = BatchNormState(
            module.get_variable(STATS, "mean"), module.get_variable(STATS, "var"), -1, -1
        )
        y = next_fun(*args, **kwargs)
        if running.mean is None:  # statistics created by this very call
            return y
        counters = _counters(lambda name: module.get_variable(STATS, name))
        module.sow(
            collection,
            "telemetry",
            layer_telemetry(
                module.conv_output(args[0]) if owns_conv else args[0],
                running,
                axis=-1 if owns_conv else module.axis,
                epsilon=module.epsilon,
                mask=kwargs.get("mask"),
                counters=counters,
            ),
        )
        return y

    with nn.intercept_methods(interceptor):
        yield


def _average_calls(calls) -> LayerTelemetry:
    calls = tuple(calls)
    if len(calls) == 1:
        return calls[0]
    return jax.tree.map(
        lambda *values: jnp.mean(jnp.stack(values), axis=0).astype(values[0].dtype), *calls
    )


def _per_layer(sown, name: str) -> dict[Path, LayerTelemetry]:
    flat = traverse_util.flatten_dict(to_dict(sown))
    return {path[:-1]: _average_calls(calls) for path, calls in flat.items() if path[-1] == name}


# --------------------------------------------------------------------------- nnx


def _telemetry_call(self, x, use_running_average=None, *, mask=None):
    running = BatchNormState(read_variable(self.mean), read_variable(self.var), -1, -1)
    y = call_parent(self, _telemetry_call, x, use_running_average, mask=mask)

    def read(name):
        variable = getattr(self, name, None)
        return read_variable(variable) if isinstance(variable, nnx.Variable) else None

    self.sow(
        nnx.Intermediate,
        COLLECTION,
        layer_telemetry(
            x, running, axis=self.axis, epsilon=self.epsilon, mask=mask, counters=_counters(read)
        ),
    )
    return y


def collect(model, *args, **kwargs):
    """Runs the model once and returns ``(output, {layer_path: LayerTelemetry})``.

    linen: ``collect(model, variables, *inputs, **apply_kwargs)``; state updates (training
    mode) are discarded: use `telemetry` in the training step to keep them. nnx:
    ``collect(model, *inputs, **call_kwargs)`` calls the model as usual (a training-mode call
    updates its statistics, as any call would). Layers called several times report the mean
    over their calls.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> x = jnp.ones((8, 3))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> logits, per_layer = collect(model, variables, x, train=False)
      >>> list(per_layer), per_layer[("norm0",)].drift.shape
      ([('norm0',)], ())
    """
    if isinstance(model, nnx.Module):
        layers = nnx_batch_norms(model).values()
        with swapped_classes(layers, lambda cls: subclass(cls, "Telemetry", _telemetry_call)):
            output, captured = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
        return output, _per_layer(nnx.to_pure_dict(captured), COLLECTION)
    variables, *inputs = args
    with telemetry():
        output, updates = model.apply(variables, *inputs, mutable=True, **kwargs)
    return output, _per_layer(updates.get(COLLECTION, {}), "telemetry")


def summaries(telemetry_tree, prefix: str = "bn/") -> dict[str, jax.Array]:
    """Flat ``{"bn/<layer path>/<field>": scalar}`` for a metrics logger.

    Accepts the sown collection (``updates["bn_telemetry"]``) or `collect`'s per-layer dict.

    Example:
      >>> per_layer = {("stage0", "norm1"): layer_telemetry(jnp.ones((2, 1)),
      ...                                                   bnjax.batch_norm_state(1))}
      >>> metrics = summaries(per_layer)
      >>> round(float(metrics["bn/stage0/norm1/mean_shift"]), 4), len(metrics)
      (1.0, 11)
    """
    if telemetry_tree and all(isinstance(k, tuple) for k in telemetry_tree):
        per_layer = dict(telemetry_tree)
    else:
        per_layer = (
            _per_layer(telemetry_tree, "telemetry") if isinstance(telemetry_tree, Mapping) else {}
        )
    return {
        f"{prefix}{path_str(path)}/{field}": value
        for path, layer in per_layer.items()
        for field, value in layer._asdict().items()
    }
