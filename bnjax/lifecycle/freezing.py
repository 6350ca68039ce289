"""Reset and freeze batch norm: fresh statistics, and fine-tuning without touching them.

The fine-tuning trap: a pretrained network fine-tuned in training mode normalizes with the
statistics of small, new batches and overwrites its running statistics with them, so it
forgets the normalization it was trained with (and evaluation then disagrees with training).
Keras asks for ``layer.trainable = False`` *and* ``training=False``; PyTorch for ``bn.eval()``
after every ``model.train()`` and ``requires_grad_(False)``; detectron2 swaps in a
FrozenBatchNorm. Here a frozen batch norm, in training mode as in evaluation:

    y = scale * (x - running_mean) / sqrt(running_var + epsilon) + bias

with the state left bit-identical (no update, no counter change), while the rest of the network
trains normally (dropout stays on). Its scale and bias remain parameters: train them or freeze
them too with `freeze_optimizer` (linen, optax) or `trainable_filter` (nnx).

    apply_fn = freeze(model.apply)                       # linen: every BN frozen
    tx = freeze_optimizer(optax.adam(1e-3), variables)   # and their scale/bias as well
    freeze(nnx_model); nnx.Optimizer(nnx_model, tx, wrt=trainable_filter(nnx_model))

In the functional core freezing is simply ``bnjax.batch_norm(..., training=False)``.

`layers` everywhere selects a subset: None (all), a predicate on the module path tuple, or a
collection of paths ("stage0_block0/norm1" strings or tuples; a single string is one path),
e.g. to freeze only the stem. A path that matches no batch-norm layer (a typo, a module that
contains norms rather than a norm itself), or a predicate that matches none, raises a
ValueError that lists the layers there are: a selection never silently does nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bnjax.lifecycle.layers import (
    COUNTER_NAMES,
    PARAMS,
    STATS,
    Selection,
    call_in_mode,
    call_parent,
    check_no_nnx_conv_norms,
    get_path,
    is_linen_batch_norm_call,
    is_linen_conv_norm_call,
    is_state,
    layer_filter,
    nnx_batch_norms,
    original_class,
    read_variable,
    set_path,
    stats_layer_paths,
    subclass,
    swap_class,
    to_dict,
    write_variable,
)

__all__ = [
    "bn_param_labels",
    "freeze",
    "freeze_optimizer",
    "frozen_statistics",
    "reset_statistics",
    "trainable_filter",
    "unfreeze",
]

_FRESH = {"mean": 0.0, "var": 1.0, "renorm_mean": 0.0, "renorm_var": 1.0}


def _fresh(name: str, value):
    return jnp.full(jnp.shape(value), _FRESH[name], jnp.asarray(value).dtype)


def _reset(name: str, value):
    """A statistic's initial value; counters (track_counters=True) back to 0; others kept."""
    if name in _FRESH:
        return _fresh(name, value)
    return jnp.zeros_like(value) if name in COUNTER_NAMES else value


def _key_names(key_path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in key_path)


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def reset_statistics(target, layers=None):
    """Resets statistics to mean 0, variance 1 (and BatchRenorm's renorm ones), counters 0.

    BatchRenorm's warm-up 'step' is kept, so the schedule does not restart.

    Args:
      target: linen variables (a dict with 'batch_stats'; returns a new dict), an nnx model
        (updated in place and returned), or any pytree of `BatchNormState` /
        `BatchRenormState` (returns a new pytree).
      layers: which layers (see the module docstring); None: all.

    Raises TypeError when `target` is none of these (a number, an array, None).

    Example:
      >>> state = reset_statistics({"layer": bnjax.BatchNormState(
      ...     jnp.ones(2), jnp.zeros(2), jnp.array(5), jnp.array(1))})["layer"]
      >>> state.mean.tolist(), state.var.tolist(), int(state.count), int(state.skipped)
      ([0.0, 0.0], [1.0, 1.0], 0, 0)
    """
    if isinstance(target, nnx.Module):
        check_no_nnx_conv_norms(target, "bnjax.lifecycle.reset_statistics")
        norms = nnx_batch_norms(target)
        select = layer_filter(layers, norms)
        for path, module in norms.items():
            if not select(path):
                continue
            for name in (*_FRESH, "count", "skipped"):
                variable = getattr(module, name, None)
                if isinstance(variable, nnx.Variable):
                    value = read_variable(variable)
                    fresh = _fresh(name, value) if name in _FRESH else jnp.zeros_like(value)
                    write_variable(variable, fresh)
        return target
    if isinstance(target, Mapping) and STATS in target:
        new = to_dict(target)
        norms = stats_layer_paths(new[STATS])
        select = layer_filter(layers, norms)
        for path in norms:
            if not select(path):
                continue
            layer = get_path(new[STATS], path)
            set_path(
                new[STATS],
                path,
                {name: _reset(name, value) for name, value in layer.items()},
            )
        return new

    states = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_state)[0]
    if not any(is_state(leaf) for _, leaf in states) and (
        target is None or jax.tree_util.treedef_is_leaf(jax.tree.structure(target))
    ):
        # A lone value (42, an array, a string) holds no batch norm: returning it as it is
        # would pass for a reset.
        raise TypeError(
            "`target` must be linen variables (a dict with 'batch_stats'), an nnx model or a "
            f"pytree of BatchNormState / BatchRenormState; got {type(target).__name__} "
            f"{_short_repr(target)}"
        )
    select = layer_filter(layers, [_key_names(path) for path, leaf in states if is_state(leaf)])

    def reset(key_path, state):
        if not is_state(state) or not select(_key_names(key_path)):
            return state
        fields = {n: _fresh(n, getattr(state, n)) for n in _FRESH if hasattr(state, n)}
        zero = jnp.zeros((), jnp.int32)
        return state._replace(**fields, count=zero, skipped=zero)

    return jax.tree_util.tree_map_with_path(reset, target, is_leaf=is_state)


# --------------------------------------------------------------------------- linen


@contextlib.contextmanager
def frozen_statistics(layers=None):
    """Within this context, linen batch norms run on their running statistics, never updating.

    Affects every ``apply`` traced inside it (bnjax BatchNorm/BatchRenorm and flax BatchNorm),
    whatever `train` / `use_running_average` says; enter it inside your jitted step, or wrap
    the apply function with `freeze`. When the context ends, `layers` is checked against the
    batch norms called inside it (ValueError for a path none of them has; nothing is checked
    when none was called, as under an already compiled jit). `freeze` checks against the
    variables instead, so it also accepts layers this particular apply does not call.

    Example:
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> with frozen_statistics():
      ...     y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> updates["batch_stats"]["mean"].tolist()          # not moved toward the batch's 2.0
      [0.0]
    """
    with _frozen(Selection(layers), check_calls=True):
        yield


@contextlib.contextmanager
def _frozen(select: Selection, *, check_calls: bool):
    """Freezes the selected linen batch norms; with `check_calls`, checks the selection
    against the batch norms called inside the context (when any were: under a cached jit
    nothing is traced, and nothing can be checked)."""
    called = []

    def interceptor(next_fun, args, kwargs, context):
        if not (is_linen_batch_norm_call(context) or is_linen_conv_norm_call(context)):
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        called.append(path)
        if select(path):
            return call_in_mode(next_fun, context.module, args, kwargs, use_running_average=True)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
    if check_calls and called:
        select.check(dict.fromkeys(called), what="batch-norm layer called")


def _frozen_call(self, x, use_running_average=None, *, mask=None):
    del use_running_average  # frozen: always the running statistics
    return call_parent(self, _frozen_call, x, True, mask=mask)


def freeze(target, layers=None):
    """Freezes batch norm: running statistics in training mode too, and no state update.

    Args:
      target: a linen apply function (``model.apply``): returns one that runs under
        `frozen_statistics`; or an nnx model: its batch norms are replaced in place by frozen
        subclasses (``model.train()`` no longer unfreezes them; `unfreeze` does) and the model
        is returned.
      layers: which layers (see the module docstring); None: all.

    Example:
      >>> model = nn.BatchNorm(use_running_average=False)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> y, updates = freeze(model.apply)(variables, x, mutable=["batch_stats"])
      >>> bool(jnp.allclose(y, x / jnp.sqrt(1.0 + 1e-5))), updates["batch_stats"]["mean"].tolist()
      (True, [0.0])
    """
    if isinstance(target, nnx.Module):
        check_no_nnx_conv_norms(target, "bnjax.lifecycle.freeze")
        norms = nnx_batch_norms(target)
        select = layer_filter(layers, norms)
        for path, module in norms.items():
            if select(path) and not getattr(type(module), "_bnjax_frozen", False):
                frozen = subclass(type(module), "Frozen", _frozen_call)
                frozen._bnjax_frozen = True
                swap_class(module, frozen)
        return target
    if isinstance(target, nn.Module) or not callable(target):
        raise TypeError(
            f"`target` must be a linen apply function (e.g. `model.apply`) or an nnx model, "
            f"got {type(target).__name__}."
        )

    select = Selection(layers)

    @functools.wraps(target)
    def frozen_apply(*args, **kwargs):
        variables = args[0] if args else kwargs.get("variables")
        known = isinstance(variables, Mapping) and isinstance(variables.get(STATS), Mapping)
        if known:  # the model's layers, called by this apply or not
            select.check(stats_layer_paths(variables[STATS]))
        with _frozen(select, check_calls=not known):
            return target(*args, **kwargs)

    return frozen_apply


def unfreeze(target):
    """Undoes `freeze`: restores an nnx model's classes (in place), or unwraps an apply fn.

    Example:
      >>> from bnjax import nnx as bnx
      >>> bn = bnx.BatchNorm(2, rngs=nnx.Rngs(0))
      >>> type(freeze(bn)).__name__, type(unfreeze(bn)).__name__
      ('FrozenBatchNorm', 'BatchNorm')
    """
    if isinstance(target, nnx.Module):
        for module in nnx_batch_norms(target).values():
            if getattr(type(module), "_bnjax_frozen", False):
                swap_class(module, original_class(type(module)))
        return target
    return getattr(target, "__wrapped__", target)


def bn_param_labels(
    variables, layers=None, *, frozen: str = "frozen", trainable: str = "trainable"
):
    """A tree like ``variables['params']`` labelling batch-norm 'scale'/'bias' `frozen`.

    Batch-norm layers are the paths holding 'mean' and 'var' in ``variables['batch_stats']``
    (the same module path in 'params'). Use with ``optax.multi_transform``.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
      >>> bn_param_labels(variables)["norm0"], bn_param_labels(variables)["dense0"]
      ({'bias': 'frozen', 'scale': 'frozen'}, {'kernel': 'trainable'})
    """
    if STATS not in variables or PARAMS not in variables:
        raise ValueError("`variables` needs both 'params' and 'batch_stats' (from model.init).")
    norms = stats_layer_paths(variables[STATS])
    select = layer_filter(layers, norms)
    norms = {path for path in norms if select(path)}

    def label(key_path, _):
        path = _key_names(key_path)
        return frozen if path[:-1] in norms and path[-1] in ("scale", "bias") else trainable

    return jax.tree_util.tree_map_with_path(label, to_dict(variables[PARAMS]))


def freeze_optimizer(
    tx: optax.GradientTransformation, variables, layers=None
) -> optax.GradientTransformation:
    """`tx` for every parameter but batch-norm scale/bias, which get no update at all.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
      >>> tx, params = freeze_optimizer(optax.sgd(1.0), variables), variables["params"]
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["norm0"]["scale"].tolist(), float(updates["dense0"]["kernel"][0, 0])
      ([0.0, 0.0, 0.0, 0.0], -1.0)
    """
    labels = bn_param_labels(variables, layers)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- nnx


def trainable_filter(model, layers=None, *, freeze_scale_and_bias: bool = True) -> Callable:
    """An nnx filter of the parameters to train (``nnx.Optimizer(..., wrt=...)``).

    With `freeze_scale_and_bias` the selected batch norms' scale and bias are left out;
    otherwise every ``nnx.Param``.

    Example:
      >>> from bnjax import nnx as bnx
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        bnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> trained = nnx.state(model, trainable_filter(model))      # what the optimizer sees
      >>> list(trained["layers"].keys())                         # the BN (layer 1) is left out
      [0]
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable_filter(model))
    """
    norms = nnx_batch_norms(model)
    select = layer_filter(layers, norms)
    norms = {path for path in norms if select(path)}

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        path = tuple(path)
        return not (freeze_scale_and_bias and path[:-1] in norms and path[-1] in ("scale", "bias"))

    return is_trainable
