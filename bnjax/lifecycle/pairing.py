"""Which batch norms fold into which Conv/Dense: read from the traced computation, not names.

`fold` pairs layers by the bundled models' names; a user's model names its layers as it likes.
`trace_pairs` reads the pairs from the program itself. It traces one evaluation-mode call of
the model (``jax.make_jaxpr``: shapes only, nothing is computed) in which every flax
Conv/Dense output and every batch norm's input passes through a marker (an identity
primitive), and then reads the jaxpr. A norm is *foldable* into the layer L when

- its input is L's output: the same jaxpr variable, with no operation in between;
- that output has no other use (a skip connection reading the pre-norm value would change);
- it normalizes L's output channels: its feature axis is the last one, statistics of shape (C,);
- L and the norm are each called once (a shared layer's kernel cannot carry two folds).

Any other norm (after an addition, a pooling, an activation or a reshape; on another axis;
inside a different traced scope than its layer, e.g. across an ``nn.remat`` boundary) is
*unfoldable*, with the reason; `bnjax.lifecycle.fold_model` keeps it as an evaluation-mode
affine map. A model without batch norm has an empty plan: nothing to fold. Layers are flax's
``nn.Conv``/``nn.Dense`` (linen) and ``nnx.Conv``/``nnx.Linear`` (nnx), subclasses included;
norms are those of `bnjax.lifecycle.layers` (bnjax's BatchNorm and BatchRenorm, flax's
BatchNorm).

Lifted transforms: a linen norm called inside ``nn.scan``, ``nn.vmap``, ``nn.remat`` (...) has
the transform's name in its `NormInfo` (``transform``), so that `fold_model` can refuse, naming
it, a layer whose variables the transform stacks (one set per step or member). An nnx model is
traced functionally (split, then merged inside the trace), and its modules are recorded by
their class, which the copies that ``nnx.remat`` and other nnx transforms run keep.

Example:
  >>> class Net(nn.Module):                      # names that say nothing about pairs
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         x = nn.Dense(3, name="a")(x)
  ...         x = nn.BatchNorm(use_running_average=True, name="b")(x)
  ...         return nn.BatchNorm(use_running_average=True, name="c")(x + 1.0)
  >>> x = jnp.ones((2, 4))
  >>> plan = trace_pairs(Net(), Net().init(jax.random.key(0), x), x)
  >>> plan.pairs
  {('b',): ('a',)}
  >>> print(plan.format())
  b <- a (folded)
  c: evaluation affine (its input is not the output of a Conv/Dense (after an addition, ...))
  1 of 2 batch norm(s) folded
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex
from jax.interpreters import batching

from bnjax.core.checks import normalize_axes
from bnjax.lifecycle.layers import (
    LINEN_BATCH_NORMS,
    LINEN_KEPT_NORMS,
    LINEN_RUNNING_VARIANCE_NORMS,
    NNX_BATCH_NORMS,
    NNX_KEPT_NORMS,
    STATS,
    Path,
    call_in_mode,
    call_parent,
    original_class,
    path_str,
    swap_class,
)

__all__ = ["LINEN_LAYERS", "NNX_LAYERS", "FoldPlan", "NormInfo", "kept_reason", "trace_pairs"]

LINEN_LAYERS = (nn.Conv, nn.Dense)
NNX_LAYERS = (nnx.Conv, nnx.Linear)
"""The layers a norm folds into: linear in their kernel, output channels on the last axis."""

# The marker: an identity primitive whose `index` parameter names the call it marks. It is only
# ever traced (never lowered), so it needs an abstract evaluation and, for models that use
# vmap-like lifted transforms, a batching rule.
_MARK = jex.Primitive("bnjax_fold_marker")
_MARK.def_impl(lambda x, *, index: x)
_MARK.def_abstract_eval(lambda x, *, index: x)
batching.primitive_batchers[_MARK] = lambda args, dims, *, index: (
    _MARK.bind(args[0], index=index),
    dims[0],
)


_NOT_A_LAYER_OUTPUT = "its input is not the output of a Conv/Dense (after an addition, ...)"


class NormInfo(NamedTuple):
    """What folding needs of one batch-norm call: epsilon, feature axes, shapes and dtypes,
    and the innermost linen lifted transform it runs in (e.g. ``"nn.scan"``; None: none).

    Example:
      >>> info = NormInfo(1e-5, (3,), (8, 4, 4, 16), np.dtype("float32"))
      >>> info.feature_axes, info.features, info.transform
      ((3,), (16,), None)
    """

    epsilon: float
    feature_axes: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_dtype: Any
    transform: str | None = None

    @property
    def features(self) -> tuple[int, ...]:
        """The shape of one call's statistics: the input's sizes on the feature axes."""
        return tuple(self.input_shape[axis] for axis in self.feature_axes)


class FoldPlan(NamedTuple):
    """The traced pairing: `pairs` {norm_path: layer_path} fold; `unfoldable` {norm_path:
    reason} stay evaluation-mode affine maps; `norms` {norm_path: NormInfo} for every norm, in
    call order; `layers` {layer_path: number of calls}.

    Example:
      >>> plan = FoldPlan({("bn",): ("conv",)}, {}, {("bn",): None}, {("conv",): 1})
      >>> print(plan.format())
      bn <- conv (folded)
      1 of 1 batch norm(s) folded
    """

    pairs: dict[Path, Path]
    unfoldable: dict[Path, str]
    norms: dict[Path, NormInfo]
    layers: dict[Path, int]
    kept: Mapping[Path, str] = MappingProxyType({})
    """{norm_path: reason} of the norms that are not affine in evaluation (FRN, EvoNorm: they
    include an activation); they run as they are, in evaluation mode."""

    def format(self) -> str:
        """One line per norm: 'norm <- layer (folded)', 'norm: evaluation affine (reason)' or
        'norm: kept as it is (reason)'."""
        kept = [f"{path_str(norm)}: kept as it is ({why})" for norm, why in self.kept.items()]
        if not self.norms:
            return "\n".join([*kept, "no batch norm: nothing to fold"])
        lines = []
        for norm in self.norms:
            if norm in self.pairs:
                lines.append(f"{path_str(norm)} <- {path_str(self.pairs[norm])} (folded)")
            else:
                lines.append(f"{path_str(norm)}: evaluation affine ({self.unfoldable[norm]})")
        lines.extend(kept)
        lines.append(f"{len(self.pairs)} of {len(self.norms)} batch norm(s) folded")
        return "\n".join(lines)


class _Recorder:
    """The calls seen while tracing: (kind, path, NormInfo or None) by marker index."""

    def __init__(self):
        self.calls: list[tuple[str, Path, NormInfo | None]] = []
        self.kept: dict[Path, str] = {}

    def mark(self, x, kind: str, path: Path, info: NormInfo | None = None):
        self.calls.append((kind, tuple(path), info))
        return _MARK.bind(x, index=len(self.calls) - 1)


_RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar("bnjax_fold_recorder", default=None)


def _norm_info(x, axis, epsilon, output, transform=None) -> NormInfo:
    axes = tuple(int(a) for a in normalize_axes(axis, x.ndim, "axis"))
    return NormInfo(float(epsilon), axes, tuple(x.shape), np.dtype(output.dtype), transform)


def _lifted_transform(module) -> str | None:
    """'nn.scan' for the class ``nn.scan(Block)`` builds (named 'ScanBlock'), ...; else None."""
    cls = type(module)
    if cls.__module__ != nn.transforms.__name__ or len(cls.__mro__) < 2:
        return None
    base = cls.__mro__[1].__name__
    prefix = cls.__name__[: -len(base)] if cls.__name__.endswith(base) else cls.__name__
    return f"nn.{prefix.lower() or 'transform'}"


def _linen_interceptor(recorder: _Recorder, variables_present):
    transforms: list[str] = []  # the lifted transforms around the current call, innermost last

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        transform = _lifted_transform(module)
        if transform is not None:
            transforms.append(transform)
            try:
                return next_fun(*args, **kwargs)
            finally:
                transforms.pop()
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if isinstance(module, LINEN_LAYERS):
            return recorder.mark(next_fun(*args, **kwargs), "layer", path)
        if isinstance(module, LINEN_KEPT_NORMS):
            recorder.kept.setdefault(path, kept_reason(module))
            if isinstance(module, LINEN_RUNNING_VARIANCE_NORMS):
                return call_in_mode(next_fun, module, args, kwargs, use_running_average=True)
            return next_fun(*args, **kwargs)
        if isinstance(module, LINEN_BATCH_NORMS):
            variables_present(module)
            x = args[0]
            marked = recorder.mark(x, "norm", path)
            y = call_in_mode(
                next_fun, module, (marked, *args[1:]), kwargs, use_running_average=True
            )
            within = transforms[-1] if transforms else None
            info = _norm_info(x, module.axis, module.epsilon, y, within)
            recorder.calls[-1] = ("norm", path, info)
            return y
        return next_fun(*args, **kwargs)

    return interceptor


def kept_reason(module) -> str:
    """Why `fold_model` keeps a norm of `LINEN_KEPT_NORMS` / `NNX_KEPT_NORMS` as it is."""
    name = type(module).__name__
    if getattr(module, "activation", True):
        reason = f"{name} includes a nonlinear activation: not affine in evaluation"
    elif hasattr(module, "use_running_average"):
        reason = f"{name} with activation=False is not folded"
    else:
        reason = f"{name} normalizes with per-example statistics: not affine in evaluation"
    if hasattr(module, "use_running_average"):
        reason += "; it runs in evaluation mode, with its running variance"
    return reason


def _check_statistics_present(module) -> None:
    missing = [n for n in ("mean", "var") if not module.has_variable(STATS, n)]
    if missing:
        raise ValueError(
            f"batch norm {path_str(tuple(module.path))!r}: running statistic(s) {missing} "
            f"missing from variables[{STATS!r}] (a checkpoint of the params alone, or a "
            f"stripped tree?). Pass the full variables of model.init / the training state, "
            f"or recalibrate the statistics (bnjax.lifecycle.recalibrate) first."
        )


def _record_nnx_call(self, *args, **kwargs):
    recorder = _RECORDER.get()
    path = type(self)._bnjax_fold_path  # the class: nnx transforms call copies of the module
    if isinstance(self, NNX_LAYERS):
        return recorder.mark(call_parent(self, _record_nnx_call, *args, **kwargs), "layer", path)
    x = args[0]
    marked = recorder.mark(x, "norm", path)
    if len(args) > 1:
        args = args[:1] + (True,) + args[2:]
    else:
        kwargs = {**kwargs, "use_running_average": True}
    y = call_parent(self, _record_nnx_call, marked, *args[1:], **kwargs)
    recorder.calls[-1] = ("norm", path, _norm_info(x, self.axis, self.epsilon, y))
    return y


@contextlib.contextmanager
def _recording(recorder: _Recorder, model):
    """nnx: the model's layers and norms record their calls (class swap, undone on exit).

    Each module gets a class of its own that carries its path: nnx transforms (``nnx.remat``,
    ...) run copies of the modules, which keep the class but not the identity.
    """
    modules = [
        (tuple(path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, (*NNX_LAYERS, *NNX_BATCH_NORMS))
    ]
    originals = [type(module) for _, module in modules]
    try:
        for (path, module), cls in zip(modules, originals, strict=True):
            swap_class(module, _recording_class(cls, path))
        yield
    finally:
        for (_, module), cls in zip(modules, originals, strict=True):
            swap_class(module, cls)


def _recording_class(base: type, path: Path) -> type:
    """A subclass of `base` whose calls are recorded as the module at `path`."""
    return type(
        f"Recording{original_class(base).__name__}",
        (base,),
        {
            "__call__": _record_nnx_call,
            "_bnjax_base": original_class(base),
            "_bnjax_fold_path": path,
            "__module__": __name__,
        },
    )


def _all_jaxprs(jaxpr):
    yield jaxpr
    for eqn in jaxpr.eqns:
        for sub in jex.jaxprs_in_params(eqn.params):
            yield from _all_jaxprs(sub)


def _read_pairs(jaxpr, calls) -> tuple[dict, dict]:
    """({norm index: layer index}, {norm index: reason}) from the marked jaxpr."""
    pairs, reasons, seen = {}, {}, set()
    for inner in _all_jaxprs(jaxpr):
        uses = collections.Counter(
            v for eqn in inner.eqns for v in eqn.invars if not isinstance(v, jex.Literal)
        )
        uses.update(v for v in inner.outvars if not isinstance(v, jex.Literal))
        producer = {v: eqn for eqn in inner.eqns for v in eqn.outvars}
        for eqn in inner.eqns:
            if eqn.primitive is not _MARK or calls[eqn.params["index"]][0] != "norm":
                continue
            index = eqn.params["index"]
            seen.add(index)
            source = producer.get(eqn.invars[0])
            if source is None or source.primitive is not _MARK:
                reasons[index] = _NOT_A_LAYER_OUTPUT
            elif uses[eqn.invars[0]] > 1:
                layer = path_str(calls[source.params["index"]][1])
                reasons[index] = f"the output of {layer} is also used elsewhere"
            else:
                pairs[index] = source.params["index"]
    for index, (kind, _, _) in enumerate(calls):
        if kind == "norm" and index not in seen:
            reasons[index] = "its call was not found in the traced program"
    return pairs, reasons


def trace_pairs(model, *args, **kwargs) -> FoldPlan:
    """The `FoldPlan` of a model: which batch norm folds into which Conv/Dense, and why not.

    linen: ``trace_pairs(model, variables, *inputs, **apply_kwargs)``; nnx:
    ``trace_pairs(model, *inputs, **call_kwargs)``. The inputs may be arrays or
    ``jax.ShapeDtypeStruct``s (only shapes are traced). Every batch norm runs in evaluation
    mode, whatever the keywords say; pass the keywords of evaluation (``train=False``) for the
    rest of the model. Norm paths are module paths (linen) or attribute paths (nnx).

    Raises ValueError when a linen norm's running statistics are missing from `variables`.
    A model without batch norm gives an empty plan (nothing to fold).

    Example:
      >>> from bnjax import models
      >>> model = models.resnet20(num_classes=10)
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
      >>> plan = trace_pairs(model, variables, x, train=False)
      >>> len(plan.pairs), plan.unfoldable
      (21, {})
      >>> plan.pairs[("stage1_block0", "shortcut_norm")]
      ('stage1_block0', 'shortcut_conv')
    """
    recorder = _Recorder()
    if isinstance(model, nnx.Module):
        # Traced functionally (merged inside the trace): nnx transforms in the model, such
        # as nnx.remat, update the modules they run, which must then belong to this trace.
        with _recording(recorder, model):
            graphdef, state = nnx.split(model)
        traced = (state, *args)

        def run(state, *inputs):
            return nnx.merge(graphdef, state, copy=True)(*inputs, **kwargs)

    elif isinstance(model, nn.Module):
        if not args:
            raise TypeError("trace_pairs(linen_model, variables, *inputs): `variables` missing.")
        if not isinstance(args[0], Mapping):
            raise TypeError(
                f"`variables` must be the model's variables dict, got {type(args[0]).__name__}"
            )
        traced = args  # the variables too: shapes are all the trace needs
        interceptor = _linen_interceptor(recorder, _check_statistics_present)

        def run(variables, *inputs):
            with nn.intercept_methods(interceptor):
                return model.apply(variables, *inputs, **kwargs)

    else:
        raise TypeError(
            f"`model` must be a flax linen or nnx Module, got {type(model).__name__}; for plain "
            f"functions use bnjax.lifecycle.fold_into on each (kernel, statistics) pair."
        )
    token = _RECORDER.set(recorder)
    try:
        jaxpr = jax.make_jaxpr(run)(*traced).jaxpr
    finally:
        _RECORDER.reset(token)
    calls = recorder.calls
    pair_index, reasons = _read_pairs(jaxpr, calls)
    times = collections.Counter((kind, path) for kind, path, _ in calls)
    norms, pairs, unfoldable = {}, {}, {}
    for index, (kind, path, info) in enumerate(calls):
        if kind != "norm":
            continue
        norms.setdefault(path, info)
        layer_index = pair_index.get(index)
        reason = reasons.get(index)
        if layer_index is not None:
            layer = calls[layer_index][1]
            if times[("norm", path)] > 1 or times[("layer", layer)] > 1:
                reason = f"{path_str(layer)} or the norm is called more than once (shared)"
            elif info.feature_axes != (len(info.input_shape) - 1,):
                reason = f"it normalizes axes {info.feature_axes}, not the channels (last axis)"
        if reason is None:
            pairs[path] = layer
        else:
            unfoldable[path] = unfoldable.get(path, reason)
            pairs.pop(path, None)
    layers = {path: n for (kind, path), n in times.items() if kind == "layer"}
    kept = recorder.kept
    if isinstance(model, nnx.Module):
        kept = {
            tuple(path): kept_reason(module)
            for path, module in nnx.iter_modules(model)
            if isinstance(module, NNX_KEPT_NORMS)
        }
    return FoldPlan(pairs, unfoldable, norms, layers, kept)
