"""Finding and reading batch-norm layers: the layer walk shared by the lifecycle tools.

`bnjax.lifecycle` (recalibrate, reset, freeze, fold, validate) and `bnjax.diagnostics` all need
the same three things: which layers of a model are batch norms, where their statistics live,
and the per-feature moments of a layer's input. This module is that one layer walk.

What counts as a *batch-norm layer*, per front end:

- **linen variables** (``model.init(...)`` output): a dict in the 'batch_stats' collection
  holding both 'mean' and 'var' (arrays of the feature shape, e.g. ``(C,)``). Its *path* is the
  module path, a tuple of names such as ``('stage0_block0', 'norm1')``; the same path leads to
  its 'scale'/'bias' under 'params'. A module built with ``track_counters=True`` also keeps
  int32 'count'/'skipped' in that same 'batch_stats' dict (optional: nothing here requires
  them). In a traced call the
  layer is a module of `LINEN_BATCH_NORMS` seen through ``flax.linen.intercept_methods``.
- **nnx**: a module of `NNX_BATCH_NORMS` found by ``nnx.iter_modules``; its path is its
  attribute path, e.g. ``('blocks', 0, 'norm')``.
- **the functional core**: a `BatchNormState` / `BatchRenormState` node of any pytree; its
  path is its jax key path, written ``'bn/0'`` by `path_str`.

Paths are tuples of keys. Users write them as ``'a/b'`` strings or tuples (a `Selection`);
they are printed with `path_str` (``jax.tree_util.keystr`` with "/" separators). The root
layer (a model that is one batch norm) has the empty path ``()``, printed ``<root>``.

Example:
  >>> variables = {"batch_stats": {"block": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}}}
  >>> [path_str(path) for path in stats_layer_paths(variables[STATS])]
  ['block/bn']
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from bnjax import linen as bnn
from bnjax import nnx as bnnx
from bnjax.core import BatchNormState, BatchRenormState, EvoNormB0State, stats
from bnjax.core.checks import broadcast_mask, normalize_axes

__all__ = [
    "COUNTER_NAMES",
    "LINEN_BATCH_NORMS",
    "LINEN_CONV_NORMS",
    "LINEN_DOMAIN_BATCH_NORMS",
    "LINEN_KEPT_NORMS",
    "LINEN_RUNNING_VARIANCE_NORMS",
    "NNX_BATCH_NORMS",
    "NNX_KEPT_NORMS",
    "NNX_RUNNING_VARIANCE_NORMS",
    "PARAMS",
    "RENORM_STATS",
    "STATE_TYPES",
    "STATS",
    "Path",
    "Selection",
    "call_in_mode",
    "call_moments",
    "call_parent",
    "check_no_conv_norms",
    "check_no_nnx_conv_norms",
    "feature_moments",
    "get_path",
    "is_linen_batch_norm_call",
    "is_linen_conv_norm_call",
    "is_linen_recalibrated_call",
    "is_state",
    "layer_filter",
    "merge_calls",
    "nnx_batch_norms",
    "original_class",
    "path_str",
    "read_variable",
    "set_path",
    "stats_layer_paths",
    "subclass",
    "swap_class",
    "swapped_classes",
    "to_dict",
    "unbiased_of",
    "variance_layer_paths",
    "write_variable",
]

Path = tuple[Any, ...]
"""A layer's path: a tuple of keys (module names, attribute names, sequence indices)."""

STATS = "batch_stats"
"""The linen collection of the running statistics ('mean', 'var'[, 'renorm_mean', ...])."""
PARAMS = "params"
"""The linen collection of the learned 'scale' and 'bias'."""
COUNTER_NAMES = ("count", "skipped")
"""bnjax's optional int32 counters, beside 'mean' and 'var' in a layer's 'batch_stats'."""
RENORM_STATS = ("renorm_mean", "renorm_var")
"""BatchRenorm's second pair of statistics (beside 'mean' and 'var')."""

LINEN_BATCH_NORMS = (bnn.BatchNorm, bnn.BatchRenorm, nn.BatchNorm, bnn.MovingAverageBatchNorm)
NNX_BATCH_NORMS = (bnnx.BatchNorm, bnnx.BatchRenorm, nnx.BatchNorm)
LINEN_RUNNING_VARIANCE_NORMS = (bnn.EvoNormB0,)
NNX_RUNNING_VARIANCE_NORMS = (bnnx.EvoNormB0,)
"""Norms with a running variance of their input but no running mean (EvoNorm-B0): not batch
norms (they are not affine in evaluation), but `recalibrate` sets their 'var'."""
LINEN_KEPT_NORMS = (bnn.FilterResponseNorm, bnn.EvoNormB0, bnn.EvoNormS0)
NNX_KEPT_NORMS = (bnnx.FilterResponseNorm, bnnx.EvoNormB0, bnnx.EvoNormS0)
"""Norms that include a nonlinear activation, so no evaluation-mode affine map: `fold_model`
runs them as they are (in evaluation mode) and lists them in ``plan.kept``."""
STATE_TYPES = (BatchNormState, BatchRenormState, EvoNormB0State)
LINEN_CONV_NORMS = (bnn.CrossIterationConvBatchNorm,)
NNX_CONV_NORMS = (bnnx.CrossIterationConvBatchNorm,)
"""Batch norms that own the conv before them: their statistics are of that conv's output."""
CONV_NORM_MARK = "past_mean_grad"
"""The 'batch_stats' entry that marks a conv-owning norm (cross-iteration batch norm)."""


def is_state(node) -> bool:
    """Whether a pytree node is a functional batch-norm state (a layer of the core)."""
    return isinstance(node, STATE_TYPES)


def path_str(path: Path) -> str:
    """A path as an 'a/b/0' string; the empty (root) path is '<root>'.

    Example:
      >>> path_str(("stage0", "norm1")), path_str(()), path_str(("blocks", 0))
      ('stage0/norm1', '<root>', 'blocks/0')
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


class Selection:
    """A `layers=` argument: None (every layer), a predicate on the path tuple, or paths.

    Paths are 'a/b' strings or tuples of keys; a single string is one path. A path matches
    a layer whose path is equal as a tuple, or equal once each key is a string (so 'blocks/0'
    selects ('blocks', 0)). `check` raises when a path (or the predicate) matches none of the
    layers that exist, so a typo is an error instead of a silent no-op.

    Example:
      >>> select = Selection(["stem/norm", ("blocks", 0, "norm")])
      >>> select(("stem", "norm")), select(("blocks", 0, "norm")), select(("head", "norm"))
      (True, True, False)
      >>> Selection(None)(("anything",))
      True
    """

    def __init__(self, layers, argument: str = "layers"):
        self.argument, self.predicate, self.paths = argument, None, None
        if layers is None:
            return
        if callable(layers):
            self.predicate = layers
            return
        if isinstance(layers, str):
            layers = [layers]
        try:
            layers = list(layers)
        except TypeError:
            raise TypeError(
                f"`{argument}` must be None, a predicate on the path tuple, or a list of "
                f"paths ('a/b' strings or tuples), got {type(layers).__name__}."
            ) from None
        if not layers:
            raise ValueError(f"`{argument}` is empty: it selects no layer (None selects all).")
        self.paths = []
        for path in layers:
            if isinstance(path, str):
                self.paths.append(tuple(path.split("/")))
            elif isinstance(path, (tuple, list)):
                self.paths.append(tuple(path))
            else:
                raise TypeError(
                    f"`{argument}` holds {path!r}; each path is an 'a/b' string or a tuple."
                )

    def _matches(self, wanted: Path, path: Path) -> bool:
        return tuple(str(k) for k in path) == wanted or tuple(path) == wanted

    def __call__(self, path: Path) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(tuple(path)))
        return self.paths is None or any(self._matches(w, path) for w in self.paths)

    def check(self, available: Iterable[Path], what: str = "batch-norm layer") -> None:
        """Raises ValueError naming the selectors that match none of `available`."""
        if self.predicate is None and self.paths is None:
            return
        available = [tuple(path) for path in available]
        if self.predicate is not None:
            if any(self(path) for path in available):
                return
            unmatched = "the predicate"
        else:
            missing = [
                path_str(wanted)
                for wanted in self.paths
                if not any(self._matches(wanted, path) for path in available)
            ]
            if not missing:
                return
            unmatched = ", ".join(repr(path) for path in missing)
        names = [path_str(path) for path in available]
        shown = ", ".join(repr(n) for n in names[:24]) + (" ..." if len(names) > 24 else "")
        raise ValueError(
            f"`{self.argument}`: {unmatched} matched no {what}. "
            + (f"The {what}s are: {shown}. " if names else f"There is no {what}. ")
            + "Pass full paths ('a/b' strings or tuples) from this list, a predicate on the "
            "path tuple, or None for all."
        )


def layer_filter(layers, available: Iterable[Path] | None = None) -> Selection:
    """A `Selection` of `layers`, checked against `available` paths when they are given."""
    selection = layers if isinstance(layers, Selection) else Selection(layers)
    if available is not None:
        selection.check(available)
    return selection


def feature_moments(x, axis, mask=None) -> stats.Moments:
    """Moments of a layer's input per feature: statistics over every axis but `axis`.

    For x of shape (N, H, W, C) and ``axis=-1`` the result holds, per channel c (shape (C,)),
    ``count_c`` (the number of values), ``mean_c = sum x / count_c`` and
    ``m2_c = sum (x - mean_c)^2`` over the N*H*W values (masked ones left out). With several
    feature axes the fields have the shape of those axes, in order.

    Args:
      x: the layer's input.
      axis: the feature axis or axes, as the batch-norm modules take it.
      mask: None, or broadcastable to x by NumPy rules as in the modules (False entries left
        out); a per-example mask for x of shape (N, ..., C) is ``mask.reshape(N, 1, ..., 1)``.

    Example:
      >>> moments = feature_moments(jnp.array([[1.0, 10.0], [3.0, 10.0]]), axis=-1)
      >>> moments.count.tolist(), moments.mean.tolist(), moments.m2.tolist()
      ([2.0, 2.0], [2.0, 10.0], [2.0, 0.0])
    """
    x = jnp.asarray(x)
    features = normalize_axes(axis, x.ndim, "axis")
    reduction = tuple(a for a in range(x.ndim) if a not in features)
    mask = broadcast_mask(mask, x)  # the modules' rule, so recalibration sees what they see
    moments = stats.moments(x, reduction, mask)
    shape = tuple(x.shape[a] for a in features)
    return stats.Moments(*(field.reshape(shape) for field in moments))


LINEN_DOMAIN_BATCH_NORMS = (bnn.DomainBatchNorm,)
"""Linen batch norms with one row of statistics per domain: `recalibrate` sets them (from
the per-example `domain` of each call); `fold_model` leaves them as they are."""


def is_linen_recalibrated_call(context) -> bool:
    """Whether an ``intercept_methods`` context is the ``__call__`` of a linen layer whose
    running statistics `recalibrate` sets (a batch norm, a domain batch norm, or a norm with a
    running variance alone such as EvoNorm-B0)."""
    recalibrated = (*LINEN_DOMAIN_BATCH_NORMS, *LINEN_RUNNING_VARIANCE_NORMS)
    return is_linen_batch_norm_call(context) or (
        context.method_name == "__call__" and isinstance(context.module, recalibrated)
    )


def call_moments(module, args, kwargs) -> stats.Moments:
    """The moments of one call's input in the shape of the layer's statistics: per feature,
    or per domain and feature for a domain batch norm (its `input_moments`)."""
    if isinstance(module, LINEN_DOMAIN_BATCH_NORMS):
        return module.input_moments(*args, **kwargs)
    return feature_moments(args[0], module.axis, kwargs.get("mask"))


def merge_calls(calls) -> stats.Moments:
    """One summary from the moments of several calls of the same layer (exact merge).

    `calls` are `Moments` of equal shapes; the result is the moments of all their values
    together (Chan et al.'s merge), as if the layer had seen them in one call.
    """
    calls = tuple(calls)
    if len(calls) == 1:
        return calls[0]
    return stats.combine(jax.tree.map(lambda *fields: jnp.stack(fields), *calls))


def unbiased_of(module) -> bool:
    """Whether a batch-norm module stores the unbiased running variance (PyTorch's choice)."""
    return bool(getattr(module, "use_unbiased_running_var", False))


# --------------------------------------------------------------------------- linen


def call_in_mode(next_fun, module, args, kwargs, *, use_running_average: bool):
    """Calls an intercepted batch-norm module with `use_running_average` forced.

    The flag goes where the module reads it: the call argument when the caller passes one,
    else the module's field, set for the duration of this call only (the bound module is a
    throwaway copy that flax rebuilds on every ``apply``).
    """
    if "use_running_average" in kwargs:
        return next_fun(*args, **{**kwargs, "use_running_average": use_running_average})
    if len(args) > 1:
        return next_fun(args[0], use_running_average, *args[2:], **kwargs)
    previous = module.use_running_average
    object.__setattr__(module, "use_running_average", use_running_average)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", previous)


def is_linen_batch_norm_call(context) -> bool:
    """Whether an ``intercept_methods`` context is the ``__call__`` of a linen batch norm."""
    return context.method_name == "__call__" and isinstance(context.module, LINEN_BATCH_NORMS)


def is_linen_conv_norm_call(context) -> bool:
    """Whether an ``intercept_methods`` context is the ``__call__`` of a norm that owns its
    conv (`LINEN_CONV_NORMS`: its statistics are those of ``module.conv_output(x)``)."""
    return context.method_name == "__call__" and isinstance(context.module, LINEN_CONV_NORMS)


def check_no_conv_norms(collection, function: str) -> None:
    """Raises a ValueError naming the layers of a 'batch_stats' collection that own their
    conv (cross-iteration batch norm): folding pairs a norm with a separate conv, and theirs
    is inside the module."""
    owners = [
        path
        for path in stats_layer_paths(collection)
        if CONV_NORM_MARK in get_path(collection, path)
    ]
    if owners:
        names = ", ".join(path_str(path) for path in owners)
        raise ValueError(
            f"{function} cannot fold {names}: a cross-iteration batch norm owns its conv, so "
            f"there is no separate conv to fold it into. Its evaluation is the affine of its "
            f"conv's output: fold it by hand with bnjax.lifecycle.fold_into(kernel, None, "
            f"mean, var, scale, bias, epsilon=...) from its 'params' and 'batch_stats', and "
            f"serve a conv with the folded kernel and bias."
        )


def check_no_nnx_conv_norms(model, function: str) -> None:
    """Raises a ValueError naming the cross-iteration conv + norm modules of an nnx model,
    which `function` does not handle (it would otherwise pass over them without a word)."""
    owners = [
        tuple(path)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, NNX_CONV_NORMS)
    ]
    if owners:
        names = ", ".join(path_str(path) for path in owners)
        raise ValueError(
            f"{function} does not handle the cross-iteration conv + norm module(s) {names} of "
            f"an nnx model. Use the linen module (bnjax.linen.CrossIterationConvBatchNorm), "
            f"which bnjax.lifecycle.recalibrate, freeze and frozen_statistics handle, or set "
            f"their mean/var (nnx.BatchStat) yourself."
        )


def to_dict(tree):
    """A plain nested-dict copy of a (Frozen)dict tree; leaves are shared, not copied."""
    if isinstance(tree, Mapping):
        return {key: to_dict(value) for key, value in tree.items()}
    return tree


def get_path(tree, path: Path, default=None):
    """``tree[path[0]][path[1]]...``, or `default` where a key is missing."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    """Sets tree[path] in a plain nested dict (creating nothing: the parents must exist)."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def stats_layer_paths(collection) -> list[Path]:
    """Paths of the layers in a 'batch_stats' collection: the dicts holding 'mean' and 'var'.

    In the order of the collection (the modules' definition order, for ``model.init``).

    Example:
      >>> stats = {"norm0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}, "head": {}}
      >>> stats_layer_paths(stats), stats_layer_paths({"mean": 0.0, "var": 1.0})
      ([('norm0',)], [()])
    """
    flat = traverse_util.flatten_dict(to_dict(collection))
    return [path[:-1] for path in flat if path[-1] == "mean" and (*path[:-1], "var") in flat]


def variance_layer_paths(collection) -> list[Path]:
    """Paths of the layers in a 'batch_stats' collection that hold a 'var' but no 'mean' (the
    running variance of an EvoNorm-B0).

    Example:
      >>> variance_layer_paths({"b0": {"var": jnp.ones(2)}, "bn": {"mean": 0.0, "var": 1.0}})
      [('b0',)]
    """
    flat = traverse_util.flatten_dict(to_dict(collection))
    return [path[:-1] for path in flat if path[-1] == "var" and (*path[:-1], "mean") not in flat]


# --------------------------------------------------------------------------- nnx


def nnx_batch_norms(model) -> dict[Path, Any]:
    """{path: module} for every batch-norm module of an nnx model, in attribute order."""
    return {
        tuple(path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, NNX_BATCH_NORMS)
    }


def original_class(cls: type) -> type:
    """The user's class behind one of our temporary subclasses (frozen, recording)."""
    return getattr(cls, "_bnjax_base", cls)


@functools.cache
def subclass(base: type, role: str, call: Callable) -> type:
    """A subclass of an nnx batch-norm class with `call` as its ``__call__`` (cached).

    `call` reaches the class it wraps with ``call_parent(self, call, ...)``.
    """
    return type(
        f"{role}{original_class(base).__name__}",
        (base,),
        {"__call__": call, "_bnjax_base": original_class(base), "__module__": __name__},
    )


def call_parent(self, call: Callable, *args, **kwargs):
    """Calls the ``__call__`` that the class defining `call` overrides.

    Not ``super(type(self), self)``: with two of our subclasses stacked (a recording subclass of
    a frozen one) that would call the outer one again, forever.
    """
    for cls in type(self).__mro__:
        if cls.__dict__.get("__call__") is call:
            return super(cls, self).__call__(*args, **kwargs)
    raise TypeError(f"{type(self).__name__} does not define the given __call__.")


def swap_class(module, cls: type) -> None:
    """Changes an nnx module's class without nnx recording '__class__' as an attribute."""
    object.__setattr__(module, "__class__", cls)


@contextlib.contextmanager
def swapped_classes(modules: Iterable, make_class: Callable[[type], type]):
    """Temporarily gives each module the class `make_class(type(module))`."""
    modules = list(modules)
    originals = [type(module) for module in modules]
    try:
        for module, cls in zip(modules, originals, strict=True):
            swap_class(module, make_class(cls))
        yield
    finally:
        for module, cls in zip(modules, originals, strict=True):
            swap_class(module, cls)


def read_variable(variable):
    """The value of an ``nnx.Variable`` (e.g. a batch norm's ``mean``)."""
    return variable[...]


def write_variable(variable, value) -> None:
    """Sets the value of an ``nnx.Variable`` in place."""
    variable[...] = value
