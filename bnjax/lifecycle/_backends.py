"""The backends of `recalibrate`, `recalibrate_nnx` and `recalibrate_states`: per-batch input
moments, and writing the result.

Each backend has ``moments(current, batch, index) -> {layer_key: Moments}`` (pure, jittable),
``check(current, shapes)`` (the stored statistics have the shapes of the moments),
``write(current, totals, final=...) -> current`` and ``statistics(current)`` (for the
fixpoint test of ``mode="full_batch"``); `current` is linen variables, an nnx state or a
pytree of functional states.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx, traverse_util

from bnjax import linen as bnn
from bnjax.core import stats
from bnjax.lifecycle.layers import (
    NNX_RUNNING_VARIANCE_NORMS,
    RENORM_STATS,
    STATS,
    Path,
    call_in_mode,
    call_moments,
    call_parent,
    check_no_nnx_conv_norms,
    feature_moments,
    get_path,
    is_linen_conv_norm_call,
    is_linen_recalibrated_call,
    is_state,
    merge_calls,
    nnx_batch_norms,
    original_class,
    path_str,
    read_variable,
    set_path,
    stats_layer_paths,
    subclass,
    swap_class,
    to_dict,
    unbiased_of,
    variance_layer_paths,
    write_variable,
)
from bnjax.lifecycle.population import LayerInput, population, population_state

MODES = ("train", "full_batch")
SOW_NAME = "bnjax_input_moments"


def check_shapes(argument: str, layer: str, stored: dict, features: tuple) -> None:
    """Raises ValueError when a layer's stored statistics do not have its input's features."""
    wrong = {name: tuple(shape) for name, shape in stored.items() if tuple(shape) != features}
    if wrong:
        held = ", ".join(f"{name} {shape}" for name, shape in wrong.items())
        raise ValueError(
            f"`{argument}`: the statistics of {layer} have the wrong shape ({held}): the "
            f"layer's input has features of shape {features}, so they must be {features} "
            f"(the state of a different layer or model? or a wrong feature `axis`)."
        )


def _stored(get) -> dict:
    """{name: shape} of the statistics a layer holds (`get(name)` None when absent)."""
    names = ("mean", "var", *RENORM_STATS)
    return {name: jax.numpy.shape(get(name)) for name in names if get(name) is not None}


# --------------------------------------------------------------------------- linen


def _estimated_moments(module, moments: stats.Moments) -> stats.Moments:
    """The moments a layer's ('mean', 'var') estimate: about the mean for batch norms; about
    zero for a moving-average batch norm in its reduced form, whose 'mean' is 0 and whose
    'var' is the second moment (so its population 'var' is mean(x^2))."""
    if isinstance(module, bnn.MovingAverageBatchNorm) and not module.centered:
        return stats.Moments(
            moments.count,
            jax.numpy.zeros_like(moments.mean),
            moments.m2 + moments.count * stats.abs_square(moments.mean),
        )
    return moments


def _linen_interceptor(training: bool, unbiased: dict):
    def interceptor(next_fun, args, kwargs, context):
        if is_linen_conv_norm_call(context):  # a norm that owns its conv: that conv's output
            module = context.module
            unbiased[tuple(module.path)] = False
            y = module.conv_output(args[0])
            module.sow(SOW_NAME, "moments", feature_moments(y, -1, kwargs.get("mask")))
            return call_in_mode(next_fun, module, args, kwargs, use_running_average=not training)
        if not is_linen_recalibrated_call(context):
            return next_fun(*args, **kwargs)
        module = context.module
        unbiased[tuple(module.path)] = unbiased_of(module)
        moments = call_moments(module, args, kwargs)
        module.sow(SOW_NAME, "moments", _estimated_moments(module, moments))
        return call_in_mode(next_fun, module, args, kwargs, use_running_average=not training)

    return interceptor


def _linen_moments(
    model: nn.Module,
    variables,
    inputs: tuple,
    apply_kwargs: dict,
    *,
    mode: str,
    axis_name,
    axis_index_groups,
    rngs,
    unbiased: dict,
) -> dict[Path, stats.Moments]:
    """`layer_input_moments`, also noting in `unbiased` each layer's
    `use_unbiased_running_var` (by module path), which the writing step needs; the
    interceptor is the one place that sees the modules, so it records them while tracing."""
    if mode not in MODES:
        raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
    with nn.intercept_methods(_linen_interceptor(mode == "train", unbiased)):
        _, updates = model.apply(variables, *inputs, mutable=True, rngs=rngs, **apply_kwargs)
    sown = traverse_util.flatten_dict(to_dict(updates.get(SOW_NAME, {})))
    moments = {path[:-1]: merge_calls(calls) for path, calls in sown.items()}
    if axis_name is not None:
        moments = {
            key: stats.merge_across_devices(value, axis_name, axis_index_groups)
            for key, value in moments.items()
        }
    return moments


def layer_input_moments(
    model: nn.Module,
    variables,
    *inputs,
    mode: str = "train",
    axis_name=None,
    axis_index_groups=None,
    rngs=None,
    **apply_kwargs,
) -> dict[Path, stats.Moments]:
    """Per-layer moments of every linen batch norm's input for one batch (pure, jittable).

    Runs ``model.apply(variables, *inputs, **apply_kwargs)`` with each batch norm switched to
    training (``mode="train"``) or evaluation (``"full_batch"``) and returns
    ``{module_path: Moments}``: per layer ``count``, ``mean`` and ``m2`` (the sum of squared
    deviations), each of the layer's feature shape, e.g. (C,) for features last; merged over
    the calls of a layer called more than once. Inside ``pmap``/``shard_map``, `axis_name`
    (and `axis_index_groups`) merge them over devices, exactly. `rngs` ({name: key}) and
    `apply_kwargs` go to ``model.apply``.

    Example:
      >>> model = nn.BatchNorm(use_running_average=True)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> moments = layer_input_moments(model, model.init(jax.random.key(0), x), x)
      >>> moments[()].mean.tolist(), moments[()].m2.tolist()
      ([2.0], [2.0])
    """
    return _linen_moments(
        model,
        variables,
        inputs,
        apply_kwargs,
        mode=mode,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        rngs=rngs,
        unbiased={},  # read by `recalibrate` only
    )


class Linen:
    """linen: `current` is the variables dict; layers are keyed by module path."""

    def __init__(self, model, variables, apply_kwargs, rngs, axis_name):
        if STATS not in variables:
            raise ValueError(
                f"`variables` has no '{STATS}' collection (keys: {sorted(variables)}); pass "
                f"the full variables from model.init, not just the params."
            )
        self.model, self.apply_kwargs, self.rngs = model, dict(apply_kwargs or {}), rngs
        self.axis_name, self.unbiased, self.mode = axis_name, {}, "train"
        self.all_layers = [
            *stats_layer_paths(variables[STATS]),
            *variance_layer_paths(variables[STATS]),
        ]

    def moments(self, current, batch, index):
        rngs = None
        if self.rngs is not None:
            rngs = {name: jax.random.fold_in(key, index) for name, key in self.rngs.items()}
        inputs = batch if isinstance(batch, tuple) else (batch,)
        return _linen_moments(
            self.model,
            current,
            inputs,
            self.apply_kwargs,
            mode=self.mode,
            axis_name=self.axis_name,
            axis_index_groups=None,
            rngs=rngs,
            unbiased=self.unbiased,
        )

    def check(self, current, shapes) -> None:
        for path, moments in shapes.items():
            layer = get_path(current[STATS], path, {})
            check_shapes(
                "variables",
                f"batch_stats {path_str(path)!r}",
                _stored(layer.get),
                tuple(moments.mean.shape),
            )

    def write(self, current, totals, *, final: bool):
        new = to_dict(current)
        for path, total in totals.items():
            layer = dict(get_path(new[STATS], path))
            unbiased = final and self.unbiased.get(path, False)
            # A running-variance layer (EvoNorm-B0) holds no mean: only its 'var' is set.
            layer["mean"], layer["var"] = population(
                total.moments, layer.get("mean", layer["var"]), layer["var"], unbiased
            )
            if "mean" not in get_path(current[STATS], path):
                del layer["mean"]
            if all(name in layer for name in RENORM_STATS):
                layer["renorm_mean"], layer["renorm_var"] = population(
                    total.moments, layer["renorm_mean"], layer["renorm_var"], False
                )
            if "count" in layer:  # counters kept (track_counters=True): batches merged/left out
                # in the counters' shape: (D,) for a domain batch norm, the same for every row
                layer["count"], layer["skipped"] = (
                    jax.numpy.broadcast_to(value, jax.numpy.shape(layer[name]))
                    for name, value in (("count", total.batches), ("skipped", total.skipped))
                )
            set_path(new[STATS], path, layer)
        return new

    def statistics(self, current):
        return {path: get_path(current[STATS], path) for path in self.all_layers}


# --------------------------------------------------------------------------- nnx


def _recording_call(use_running_average: bool):
    def __call__(self, x, use_running_average_=None, *, mask=None):
        self.sow(nnx.Intermediate, SOW_NAME, feature_moments(x, self.axis, mask))
        return call_parent(self, __call__, x, use_running_average, mask=mask)

    return __call__


_RECORDING_CALLS = {True: _recording_call(False), False: _recording_call(True)}


class Nnx:
    """nnx: `current` is the model's ``nnx.State``; each batch runs on a merged copy whose
    batch norms record their inputs (a subclass swapped in on the copy only)."""

    def __init__(self, model, forward, axis_name):
        check_no_nnx_conv_norms(model, "bnjax.lifecycle.recalibrate_nnx")
        self.model, self.axis_name, self.mode = model, axis_name, "train"
        self.forward = forward or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
        domain_norms = [
            path_str(tuple(p)) for p, m in nnx.iter_modules(model) if hasattr(m, "num_domains")
        ]
        if domain_norms:
            raise ValueError(
                f"recalibrate_nnx does not set the per-domain statistics of DomainBatchNorm "
                f"layers ({', '.join(domain_norms)}): recalibrate the linen model with "
                f"bnjax.lifecycle.recalibrate (batches of (x, domain) and a `method` that "
                f"passes the domain), or run training passes with momentum=None and "
                f"track_counters=True (a per-domain average of batch statistics)."
            )
        self.graphdef, self.state = nnx.split(model)
        self.unbiased = {p: unbiased_of(m) for p, m in _recalibrated(model).items()}
        self.all_layers = list(self.unbiased)

    def moments(self, current, batch, index):
        del index
        copy = nnx.merge(self.graphdef, current)
        call = _RECORDING_CALLS[self.mode == "train"]
        for module in _recalibrated(copy).values():
            base = original_class(type(module))  # recalibrate frozen layers too
            swap_class(module, subclass(base, "Recording", call))
        _, captured = nnx.capture(self.forward, nnx.Intermediate)(copy, batch)
        flat = traverse_util.flatten_dict(nnx.to_pure_dict(captured))
        moments = {p[:-1]: merge_calls(v) for p, v in flat.items() if p[-1] == SOW_NAME}
        if self.axis_name is not None:
            moments = {k: stats.merge_across_devices(v, self.axis_name) for k, v in moments.items()}
        return moments

    def check(self, current, shapes) -> None:
        layers = _recalibrated(nnx.merge(self.graphdef, current))
        for path, moments in shapes.items():
            module = layers[path]

            def get(name, module=module):
                variable = getattr(module, name, None)
                return read_variable(variable) if isinstance(variable, nnx.Variable) else None

            check_shapes(
                "model",
                f"the batch norm {path_str(path)!r}",
                _stored(get),
                tuple(moments.mean.shape),
            )

    def write(self, current, totals, *, final: bool):
        copy = nnx.merge(self.graphdef, current)
        layers = _recalibrated(copy)
        for path, total in totals.items():
            module = layers[path]
            unbiased = final and self.unbiased[path]
            for mean_name, var_name, use_unbiased in (
                ("mean", "var", unbiased),
                ("renorm_mean", "renorm_var", False),
            ):
                if not isinstance(getattr(module, var_name, None), nnx.Variable):
                    continue
                mean_var, var_var = getattr(module, mean_name, None), getattr(module, var_name)
                mean, var = population(
                    total.moments,
                    read_variable(var_var if mean_var is None else mean_var),
                    read_variable(var_var),
                    use_unbiased,
                )
                if mean_var is not None:  # a running-variance layer (EvoNorm-B0) has none
                    write_variable(mean_var, mean)
                write_variable(var_var, var)
            for name, value in (("count", total.batches), ("skipped", total.skipped)):
                if isinstance(getattr(module, name, None), nnx.Variable):
                    write_variable(getattr(module, name), value)
        return nnx.state(copy)

    def statistics(self, current):
        copy = nnx.merge(self.graphdef, current)
        return {
            path: tuple(
                read_variable(getattr(module, name))
                for name in ("mean", "var")
                if isinstance(getattr(module, name, None), nnx.Variable)
            )
            for path, module in _recalibrated(copy).items()
        }


def _recalibrated(model) -> dict:
    """{path: module} of the nnx layers `recalibrate_nnx` sets: the batch norms and the
    running-variance norms (EvoNorm-B0), the batch norms first."""
    return {
        **nnx_batch_norms(model),
        **{
            tuple(path): module
            for path, module in nnx.iter_modules(model)
            if isinstance(module, NNX_RUNNING_VARIANCE_NORMS)
        },
    }


# --------------------------------------------------------------------------- functional


class Functional:
    """Functional core: `current` is the pytree of states; layers are keyed by leaf position."""

    def __init__(self, layer_inputs, states, unbiased, axis_name):
        self.layer_inputs, self.axis_name, self.mode = layer_inputs, axis_name, "train"
        leaves, self.treedef = jax.tree.flatten(states, is_leaf=is_state)
        self.positions = [i for i, leaf in enumerate(leaves) if is_state(leaf)]
        paths = jax.tree_util.tree_flatten_with_path(states, is_leaf=is_state)[0]
        self.names = {i: path_str(path) for i, (path, _) in enumerate(paths)}
        if not self.positions:
            raise ValueError(
                "`states` holds no BatchNormState, BatchRenormState or EvoNormB0State."
            )
        self.unbiased = unbiased
        self.all_layers = self.positions

    def moments(self, current, batch, index):
        del index
        inputs = self.layer_inputs(current, batch, self.mode == "train")

        def is_input(node):
            return node is None or isinstance(node, LayerInput)

        flat, _ = jax.tree.flatten(inputs, is_leaf=is_input)
        if len(flat) != len(self.positions):
            raise ValueError(
                f"`layer_inputs` returned {len(flat)} inputs for {len(self.positions)} states: "
                f"return the states' structure with each state replaced by its layer's input."
            )
        moments = {}
        for position, item in zip(self.positions, flat, strict=True):
            if item is None:
                continue
            item = item if isinstance(item, LayerInput) else LayerInput(item)
            moments[position] = feature_moments(item.x, item.axis, item.mask)
            if self.axis_name is not None:
                moments[position] = stats.merge_across_devices(moments[position], self.axis_name)
        return moments

    def check(self, current, shapes) -> None:
        leaves = jax.tree.flatten(current, is_leaf=is_state)[0]
        for position, moments in shapes.items():
            check_shapes(
                "states",
                f"the state at {self.names[position]!r}",
                _stored(leaves[position]._asdict().get),
                tuple(moments.mean.shape),
            )

    def write(self, current, totals, *, final: bool):
        leaves = jax.tree.flatten(current, is_leaf=is_state)[0]
        for position, total in totals.items():
            leaves[position] = population_state(
                total.moments,
                leaves[position],
                unbiased=final and self.unbiased,
                batches=total.batches,
                skipped=total.skipped,
            )
        return jax.tree.unflatten(self.treedef, leaves)

    def statistics(self, current):
        leaves = jax.tree.flatten(current, is_leaf=is_state)[0]
        return {p: (getattr(leaves[p], "mean", None), leaves[p].var) for p in self.positions}
