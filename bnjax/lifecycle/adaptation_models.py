"""Test-time adaptation of linen and nnx models, and offline AdaBN (`adapt_statistics`).

`adapter` (linen) and `adapter_nnx` build the ``forward(params, norm_states, batch)`` of
`bnjax.lifecycle.adaptation.adapter_from_forward` from a model: every batch norm of the model
(bnjax's BatchNorm, BatchRenorm, MovingAverageBatchNorm, flax's BatchNorm; linen or nnx) is
replaced, for the call only, by the core normalization of the method's statistics, with the
layer's own scale, bias, epsilon, feature axis and mask. The other layers run as the model
says (pass ``apply_kwargs={"train": False}``: dropout off). The trainable leaves are the batch
norms' 'scale' and 'bias'; everything else is left bit-for-bit as trained.

Layers whose statistics are not a per-feature mean and variance (domain batch norm, the
conv-owning cross-iteration batch norm, EvoNorm-B0's running variance) are refused by name:
adapt a plain batch norm (`select_domain` turns a domain's statistics into one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bnjax.core import (
    batch_norm,
    batch_norm_state,
    stream_batch_renorm,
    stream_renorm_state,
    stream_renorm_state_from,
    streaming_population_norm,
    streaming_population_state,
)
from bnjax.lifecycle.adaptation import (
    Adapter,
    adapter_from_forward,
    method_options,
    resolve_method,
)
from bnjax.lifecycle.freezing import bn_param_labels
from bnjax.lifecycle.layers import (
    LINEN_BATCH_NORMS,
    NNX_BATCH_NORMS,
    PARAMS,
    STATS,
    nnx_batch_norms,
    path_str,
    read_variable,
    stats_layer_paths,
    subclass,
    swap_class,
    to_dict,
)
from bnjax.lifecycle.recalibration import recalibrate

__all__ = ["adapt_statistics", "adapter", "adapter_nnx", "blend_statistics"]

_UNSUPPORTED_HINT = (
    "test-time adaptation sets per-feature batch statistics; this layer keeps another kind "
    "(per domain, its own conv, or a running variance alone)"
)


def _initial_states(statistics: str, layers: Mapping[str, tuple], options: dict) -> dict:
    """{layer: state} at the source: `layers` maps each name to (source mean, source var)."""
    if statistics == "renorm":
        # Uninitialized (count 0): the first call sets it, from the source statistics with
        # the layer's own epsilon (init="source") or from the first batch (DELTA's choice).
        return {name: stream_renorm_state(mean.shape) for name, (mean, _) in layers.items()}
    if statistics == "population":
        return {
            name: streaming_population_state(mean, var, prior_count=options["prior_count"])
            for name, (mean, var) in layers.items()
        }
    return {}


def _normalize(statistics, options, x, state, scale, bias, source, epsilon, axis, mask):
    """(y, new_state) of one batch-norm call under the method's statistics."""
    if statistics == "batch":
        y, _ = batch_norm(
            x,
            batch_norm_state(source[0].shape),  # the source mean has the feature shape
            scale,
            bias,
            training=True,
            momentum=0.0,
            epsilon=epsilon,
            axis=axis,
            mask=mask,
        )
        return y, state
    if statistics == "renorm":
        if options["init"] == "source":
            start = stream_renorm_state_from(*source, epsilon=epsilon)
            state = jax.tree.map(lambda s, new: jnp.where(state.count > 0, s, new), state, start)
        return stream_batch_renorm(
            x,
            state,
            scale,
            bias,
            momentum=options["momentum"],
            epsilon=epsilon,
            axis=axis,
            mask=mask,
        )
    return streaming_population_norm(x, state, scale, bias, epsilon=epsilon, axis=axis, mask=mask)


class _Calls:
    """The states a forward pass reads and writes, by layer name (one call per layer)."""

    def __init__(self, states: Mapping[str, Any]):
        self.states, self.new = dict(states), {}

    def take(self, name: str):
        if name in self.new:
            raise ValueError(
                f"The batch norm {name!r} is called more than once in one forward pass: "
                f"test-time adaptation keeps one state per layer. Give each call its own "
                f"layer."
            )
        return self.states.get(name)

    def result(self) -> dict:
        return {**self.states, **self.new}


def _check_statistics_layers(variables) -> dict[str, tuple]:
    if STATS not in variables or PARAMS not in variables:
        raise ValueError(
            "`variables` needs 'params' and 'batch_stats' (from model.init): test-time "
            "adaptation works on a model's batch norms."
        )
    collection = to_dict(variables[STATS])
    layers = {}
    for path in stats_layer_paths(collection):
        node = collection
        for key in path:
            node = node[key]
        layers[path_str(path)] = (jnp.asarray(node["mean"]), jnp.asarray(node["var"]))
    if not layers:
        raise ValueError("`variables` has no batch norm ('mean' and 'var' in 'batch_stats').")
    return layers


def adapter(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    method: str = "delta",
    optimizer: optax.GradientTransformation | None = None,
    episodic: bool = False,
    steps: int = 1,
    num_classes: int | None = None,
    class_momentum: float = 0.95,
    statistics_options: Mapping[str, Any] | None = None,
    objective: str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    logits: Callable[[Any], jax.Array] | None = None,
) -> Adapter:
    """A test-time adapter for a linen model (methods: `bnjax.lifecycle.adaptation.METHODS`).

    Args:
      model: a ``flax.linen.Module`` with batch norms (bnjax's or flax's).
      variables: its trained variables ('params', 'batch_stats'); never modified.
      method: "source", "test_batch", "adabn", "tent", "tbr" or "delta".
      optimizer: an optax optimizer for "tent"/"delta" (TENT: ``optax.sgd(1e-3, 0.9)``;
        DELTA: ``optax.adam(1e-3)`` at batch 64 in the papers; scale it with your setting).
      episodic: reset to the source before every batch.
      steps: updates per batch.
      num_classes: K (required by "delta": its class-frequency estimate).
      class_momentum: DOT's decay of the class-frequency estimate (0.95).
      statistics_options: "momentum" (TBR's decay, 0.95), "init" ("source": TBR starts from
        the trained statistics; "first_batch": from the first test batch, as DELTA's code),
        "prior_count" (AdaBN's source pseudo-count per feature, 0: the stream's alone).
      objective: override the method's objective (None keeps it).
      apply_kwargs: ``model.apply`` keywords, e.g. ``{"train": False}``.
      logits: maps the model's output to the (N, K) logits (default: the output itself).

    Returns:
      An `Adapter`: ``state = adapter.init()``, ``logits, state = adapter.step(state, x)``.

    Example:
      >>> from bnjax import models
      >>> model = models.SmallCNN(features=(4,), num_classes=3)
      >>> x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
      >>> variables = model.init(jax.random.key(1), x, train=False)
      >>> tent = adapter(model, variables, method="tent", optimizer=optax.sgd(1e-2),
      ...                apply_kwargs={"train": False})
      >>> logits, state = jax.jit(tent.step)(tent.init(), x + 3.0)   # a shifted batch
      >>> logits.shape, bool((state.params["head"]["kernel"]
      ...                     == variables["params"]["head"]["kernel"]).all())
      ((8, 3), True)
    """
    chosen = resolve_method(method, objective)
    options = method_options(statistics_options)
    apply_kwargs = dict(apply_kwargs or {})
    to_logits = logits or (lambda out: out)
    layers = _check_statistics_layers(variables)
    others = {k: v for k, v in variables.items() if k != PARAMS}
    trainable = jax.tree.map(
        lambda label: label == "adapt", bn_param_labels(variables, frozen="adapt")
    )

    def forward(params, norm_states, batch):
        inputs = batch if isinstance(batch, tuple) else (batch,)
        merged = {**others, PARAMS: params}
        if chosen.statistics == "source":
            return to_logits(model.apply(merged, *inputs, **apply_kwargs)), norm_states
        calls = _Calls(norm_states)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if not isinstance(module, LINEN_BATCH_NORMS):
                if _has_statistics(module):
                    raise ValueError(
                        f"The layer {path_str(tuple(module.path))!r} "
                        f"({type(module).__name__}) cannot be adapted: {_UNSUPPORTED_HINT}."
                    )
                return next_fun(*args, **kwargs)
            name = path_str(tuple(module.path))
            state = calls.take(name)
            own = module.variables.get(PARAMS, {})
            x = args[0]
            y, new = _normalize(
                chosen.statistics,
                options,
                x,
                state,
                own.get("scale"),
                own.get("bias"),
                layers[name],
                float(module.epsilon),
                module.axis,
                kwargs.get("mask"),
            )
            if new is not None:
                calls.new[name] = new
            return y if module.dtype is None else y.astype(module.dtype)

        with nn.intercept_methods(interceptor):
            out = model.apply(merged, *inputs, **apply_kwargs)
        return to_logits(out), calls.result()

    return adapter_from_forward(
        forward,
        variables[PARAMS],
        _initial_states(chosen.statistics, layers, options),
        trainable=trainable,
        objective=chosen.objective,
        optimizer=optimizer,
        episodic=episodic,
        steps=steps,
        num_classes=num_classes,
        class_momentum=class_momentum,
        method=method,
    )


def _has_statistics(module) -> bool:
    return module.has_variable(STATS, "mean") or module.has_variable(STATS, "var")


def _adapting_call(self, x, use_running_average=None, *, mask=None):
    """The ``__call__`` of an nnx batch norm during adaptation (see `adapter_nnx`)."""
    del use_running_average
    name, calls, normalize = self._bnjax_adaptation
    state = calls.take(name)
    scale = None if getattr(self, "scale", None) is None else read_variable(self.scale)
    bias = None if getattr(self, "bias", None) is None else read_variable(self.bias)
    source = (read_variable(self.mean), read_variable(self.var))
    y, new = normalize(x, state, scale, bias, source, float(self.epsilon), self.axis, mask)
    if new is not None:
        calls.new[name] = new
    return y if self.dtype is None else y.astype(self.dtype)


def adapter_nnx(
    model: nnx.Module,
    *,
    method: str = "delta",
    optimizer: optax.GradientTransformation | None = None,
    episodic: bool = False,
    steps: int = 1,
    num_classes: int | None = None,
    class_momentum: float = 0.95,
    statistics_options: Mapping[str, Any] | None = None,
    objective: str | None = None,
    forward: Callable[[nnx.Module, Any], Any] | None = None,
) -> Adapter:
    """A test-time adapter for an nnx model (same methods and options as `adapter`).

    The model is split into pure state once; every step runs on a merged copy, so `model`
    itself is never modified (call ``model.eval()`` first: dropout off). The adapted
    parameters are ``state.params``, a pure dict of the model's ``nnx.Param`` values
    (``nnx.to_pure_dict`` layout); put them back with ``nnx.replace_by_pure_dict``.

    Args:
      model: an ``nnx.Module`` with batch norms (bnjax's or flax's).
      forward: ``forward(model, batch) -> logits``; default ``model(batch)``.
      (the others: see `adapter`)

    Example:
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
      >>> tbr = adapter_nnx(model, method="tbr")
      >>> logits, state = tbr.step(tbr.init(), jnp.ones((5, 3)))
      >>> logits.shape, int(state.norm_states["layers/1"].count)
      ((5, 4), 2)
    """
    chosen = resolve_method(method, objective)
    options = method_options(statistics_options)
    run = forward or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
    norms = nnx_batch_norms(model)
    unsupported = [
        path_str(tuple(path))
        for path, module in nnx.iter_modules(model)
        if not isinstance(module, NNX_BATCH_NORMS) and _holds_statistics(module)
    ]
    if unsupported:
        raise ValueError(f"The layers {unsupported} cannot be adapted: {_UNSUPPORTED_HINT}.")
    if not norms:
        raise ValueError("`model` has no batch norm to adapt.")
    layers = {
        path_str(path): (read_variable(m.mean), read_variable(m.var)) for path, m in norms.items()
    }
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    norm_paths = set(norms)

    def is_norm_affine(key_path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        return keys[:-1] in norm_paths and keys[-1] in ("scale", "bias")

    trainable = jax.tree_util.tree_map_with_path(is_norm_affine, params)

    def run_forward(pure_params, norm_states, batch):
        state = jax.tree.map(lambda v: v, params_state)
        nnx.replace_by_pure_dict(state, pure_params)
        copy = nnx.merge(graphdef, state, rest)
        if chosen.statistics == "source":
            copy.eval()
            return run(copy, batch), norm_states
        calls = _Calls(norm_states)

        def normalize(x, st, scale, bias, source, epsilon, axis, mask):
            return _normalize(
                chosen.statistics, options, x, st, scale, bias, source, epsilon, axis, mask
            )

        for path, module in nnx_batch_norms(copy).items():
            object.__setattr__(module, "_bnjax_adaptation", (path_str(path), calls, normalize))
            swap_class(module, subclass(type(module), "Adapting", _adapting_call))
        out = run(copy, batch)
        return out, calls.result()

    return adapter_from_forward(
        run_forward,
        params,
        _initial_states(chosen.statistics, layers, options),
        trainable=trainable,
        objective=chosen.objective,
        optimizer=optimizer,
        episodic=episodic,
        steps=steps,
        num_classes=num_classes,
        class_momentum=class_momentum,
        method=method,
    )


def _holds_statistics(module) -> bool:
    """Whether an nnx module keeps running statistics of its own (an ``nnx.BatchStat``)."""
    return any(isinstance(value, nnx.BatchStat) for value in vars(module).values())


def blend_statistics(source_mean, source_var, target_mean, target_var, target_weight: float):
    """(mean, var) of the mixture of source and target with weight `target_weight` on the
    target: ``mean = (1 - w) mu_s + w mu_t``, ``var = (1 - w) var_s + w var_t +
    w (1 - w) (mu_s - mu_t)^2`` (the variance of the mixture, spread of the means included).

    Example:
      >>> ones = jnp.ones(1)
      >>> mean, var = blend_statistics(0 * ones, ones, 2 * ones, ones, target_weight=0.5)
      >>> float(mean[0]), float(var[0])
      (1.0, 2.0)
    """
    w = target_weight
    mean = (1 - w) * source_mean + w * target_mean
    var = (
        (1 - w) * source_var + w * target_var + w * (1 - w) * jnp.square(source_mean - target_mean)
    )
    return mean, var


def adapt_statistics(
    model: nn.Module,
    variables: Mapping[str, Any],
    target_batches: Iterable,
    *,
    target_weight: float = 1.0,
    mode: str = "train",
    num_batches: int | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    jit: bool = True,
) -> dict:
    """AdaBN offline: every batch norm's statistics set from the target data (a linen model).

    `bnjax.lifecycle.recalibrate` over `target_batches` gives each layer the exact population
    statistics of the target; `target_weight` < 1 blends them with the source's
    (`blend_statistics`, the mixture's mean and variance). Unlike the streaming methods this
    reads the whole target set before predicting anything, so it cannot serve a stream, but
    it does not depend on the order of the batches.

    Args:
      model, variables: the trained linen model and its variables (not modified).
      target_batches: model inputs from the target distribution (see `recalibrate`).
      target_weight: w in [0, 1]; 1 (default) replaces the statistics (AdaBN).
      mode, num_batches, apply_kwargs, jit: as `recalibrate`.

    Returns:
      New variables with adapted 'batch_stats' (the parameters unchanged).

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> x = jax.random.normal(jax.random.key(0), (32, 3))
      >>> variables = model.init(jax.random.key(1), x[:2], train=False)
      >>> target = [x[:16] + 2.0, x[16:] + 2.0]                  # a shifted target domain
      >>> adapted = adapt_statistics(model, variables, target, apply_kwargs={"train": False})
      >>> h = (x + 2.0) @ adapted["params"]["dense0"]["kernel"]  # what reaches norm0
      >>> bool(jnp.allclose(adapted["batch_stats"]["norm0"]["mean"], h.mean(0), atol=1e-4))
      True
    """
    if not 0.0 <= float(target_weight) <= 1.0:
        raise ValueError(f"`target_weight` must be in [0, 1], got {target_weight!r}.")
    target = recalibrate(
        model,
        variables,
        target_batches,
        mode=mode,
        num_batches=num_batches,
        apply_kwargs=apply_kwargs,
        jit=jit,
    )
    if target_weight == 1.0:
        return target
    source_stats, target_stats = to_dict(variables[STATS]), to_dict(target[STATS])
    blended = jax.tree.map(lambda v: v, target_stats)
    for path in stats_layer_paths(source_stats):
        src, tgt, out = source_stats, target_stats, blended
        for key in path:
            src, tgt, out = src[key], tgt[key], out[key]
        out["mean"], out["var"] = blend_statistics(
            src["mean"], src["var"], tgt["mean"], tgt["var"], float(target_weight)
        )
    return {**target, STATS: blended}
