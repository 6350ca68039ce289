"""What the lifecycle tools share: which modules are batch norms, their input moments, paths.

A batch-norm *layer* is found three ways, one per front end:

- linen: a module call seen through ``flax.linen.intercept_methods`` (bnjax's `BatchNorm`,
  `BatchRenorm`, or flax's own `BatchNorm`), and in a variables tree a dict of 'batch_stats'
  holding both 'mean' and 'var'. Its key is the module path, e.g. ('stage0_block0', 'norm1'),
  the same path under 'params' (scale, bias), 'batch_stats' and 'bn_counters'.
- nnx: a module of those classes found by ``nnx.iter_modules``; key = its attribute path.
- functional: a `BatchNormState` / `BatchRenormState` leaf of a pytree.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bnjax import linen as bnn
from bnjax import nnx as bnnx
from bnjax.core import BatchNormState, BatchRenormState, stats
from bnjax.core.checks import normalize_axes

Path = tuple[Any, ...]

STATS = "batch_stats"
PARAMS = "params"
COUNTERS = bnn.COUNTERS
RENORM_STATS = ("renorm_mean", "renorm_var")

LINEN_BATCH_NORMS = (bnn.BatchNorm, bnn.BatchRenorm, nn.BatchNorm)
NNX_BATCH_NORMS = (bnnx.BatchNorm, bnnx.BatchRenorm, nnx.BatchNorm)
STATE_TYPES = (BatchNormState, BatchRenormState)


def is_state(node) -> bool:
    return isinstance(node, STATE_TYPES)


def path_str(path: Path) -> str:
    return "/".join(str(key) for key in path) or "<root>"


class Selection:
    """A `layers=` argument: None (every layer), a predicate on the path tuple, or paths.

    Paths are 'a/b' strings or tuples of keys; a single string is one path. `check` raises
    when a path (or the predicate) matches none of the layers that exist, so a typo is an
    error instead of a silent no-op.
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
                "/".join(str(k) for k in wanted)
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
    """Moments of `x` per feature (statistics over every axis but `axis`), feature-shaped.

    `mask`: None, (N,) per example, or broadcastable to x (False entries left out), as the
    batch-norm modules take it.
    """
    x = jnp.asarray(x)
    features = normalize_axes(axis, x.ndim, "axis")
    reduction = tuple(a for a in range(x.ndim) if a not in features)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim == 1 and x.ndim > 1:
            mask = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        mask = jnp.broadcast_to(mask.astype(bool), x.shape)
    moments = stats.moments(x, reduction, mask)
    shape = tuple(x.shape[a] for a in features)
    return stats.Moments(*(field.reshape(shape) for field in moments))


def merge_calls(calls) -> stats.Moments:
    """One summary from the moments of several calls of the same layer (exact merge)."""
    calls = tuple(calls)
    if len(calls) == 1:
        return calls[0]
    return stats.combine(jax.tree.map(lambda *fields: jnp.stack(fields), *calls))


def unbiased_of(module) -> bool:
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
    return context.method_name == "__call__" and isinstance(context.module, LINEN_BATCH_NORMS)


def to_dict(tree):
    """A plain nested-dict copy of a (Frozen)dict tree; leaves are shared, not copied."""
    if isinstance(tree, Mapping):
        return {key: to_dict(value) for key, value in tree.items()}
    return tree


def get_path(tree, path: Path, default=None):
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
    """Paths of the dicts in a 'batch_stats' collection that hold both 'mean' and 'var'."""
    found = []

    def visit(node, path):
        if not isinstance(node, Mapping):
            return
        if "mean" in node and "var" in node and not isinstance(node["mean"], Mapping):
            found.append(path)
            return
        for key, value in node.items():
            visit(value, (*path, key))

    visit(collection, ())
    return found


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
    return variable[...]


def write_variable(variable, value) -> None:
    variable[...] = value
