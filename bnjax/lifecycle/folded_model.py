"""Any linen or nnx model, in evaluation mode, with its batch norms folded: `fold_model`.

`fold` returns params for a bundled model rebuilt without norms; a user's model has no such
twin. `fold_model` instead re-runs the user's own model with each batch norm replaced, using
the pairs `trace_pairs` reads from the traced computation:

- a norm paired with the Conv/Dense L that feeds it is the identity, and L computes
  ``x * W' + b'`` with ``W' = W * g``, ``b' = (b - mean) * g + beta`` and
  ``g = scale / sqrt(var + epsilon)`` (`fold_into`, the norm's own epsilon);
- every other batch norm (after an addition or a pooling, ...) is its evaluation-mode affine
  map ``x * g + (beta - mean * g)`` over its feature axes (`evaluation_affine`), listed in
  ``plan.unfoldable`` with the reason;
- a norm that is not affine in evaluation because it includes an activation (FRN + TLU,
  EvoNorm) runs as it is, EvoNorm-B0 in evaluation mode, and is listed in ``plan.kept``.

Either way a norm never sees batch statistics: the folded model is batch independent, and
equals the unfolded model in evaluation mode to float32 rounding. A model without batch norm
has nothing to fold: the result runs the model as it is (``plan.format()`` says so).

Lifted transforms: norms inside ``nnx.remat`` and ``nn.remat``, and inside an ``nn.vmap`` or
``nn.scan`` whose variables are shared (broadcast), fold as anywhere else. A norm whose
variables a transform stacks (``nn.scan`` / ``nn.vmap`` with ``variable_axes`` on the
statistics: one set per step or member) is refused with a ValueError naming the transform:
each step would need its own folded kernel. Export such a model unfolded
(``bnjax.export.export_function`` of its evaluation-mode apply). linen: the model runs under
``nn.intercept_methods`` with folded params; nnx: a clone of the model with folded kernels
and biases whose norms are replaced (the original model is untouched).

Example:
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, train: bool = False):
  ...         x = nn.Conv(4, (3, 3), use_bias=False, name="features")(x)
  ...         x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
  ...         return nn.Dense(2, name="head")(nn.relu(x).mean((1, 2)))
  >>> x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
  >>> variables = Net().init(jax.random.key(1), x)
  >>> folded = fold_model(Net(), variables, x, train=False)
  >>> folded.plan.pairs
  {('bn',): ('features',)}
  >>> bool(jnp.allclose(folded(x), folded.evaluate(x), atol=1e-5))   # = Net in evaluation
  True
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnjax.lifecycle.folding import _refuse, _unfoldable, evaluation_affine, fold_into
from bnjax.lifecycle.layers import (
    LINEN_BATCH_NORMS,
    LINEN_RUNNING_VARIANCE_NORMS,
    NNX_RUNNING_VARIANCE_NORMS,
    PARAMS,
    STATS,
    call_in_mode,
    call_parent,
    check_no_conv_norms,
    check_no_nnx_conv_norms,
    get_path,
    is_linen_batch_norm_call,
    nnx_batch_norms,
    original_class,
    path_str,
    read_variable,
    set_path,
    subclass,
    swap_class,
    swapped_classes,
    to_dict,
    write_variable,
)
from bnjax.lifecycle.pairing import FoldPlan, NormInfo, trace_pairs
from bnjax.linen.standardized_conv import kernel_map, stored_kernels
from bnjax.nnx.standardized_conv import KernelFirst

__all__ = ["FoldedModel", "fold_model"]


def _affine(x, gain, shift, info: NormInfo):
    """``x * gain + shift`` with (feature-shaped) gain and shift broadcast over `info`'s axes."""
    shape = [1] * x.ndim
    for axis in info.feature_axes:
        shape[axis] = x.shape[axis]
    y = x.astype(jnp.promote_types(x.dtype, gain.dtype)) * gain.reshape(shape)
    return (y + shift.reshape(shape)).astype(info.output_dtype)


class FoldedModel:
    """A model in evaluation mode with its batch norms folded (see the module docstring).

    Call it as the model: ``folded(*inputs)``; `evaluate` runs the unfolded model in
    evaluation mode (the reference it equals). Attributes: ``plan`` (the `FoldPlan`),
    ``statistics`` ({norm_path: {'mean', 'var'}}, numpy, of every norm), ``model``.

    Example:
      >>> model, x = nn.Dense(2), jnp.ones((3, 4))
      >>> bn = nn.BatchNorm(use_running_average=True)
      >>> net = nn.Sequential([model, bn])
      >>> folded = fold_model(net, net.init(jax.random.key(0), x), x)
      >>> folded(x).shape, sorted(folded.statistics[("layers_1",)])
      ((3, 2), ['mean', 'var'])
    """

    def __init__(self, model, plan: FoldPlan, statistics, call, reference):
        self.model, self.plan, self.statistics = model, plan, statistics
        self._call, self._reference = call, reference

    def __call__(self, *inputs):
        return self._call(*inputs)

    def evaluate(self, *inputs):
        """The unfolded model's outputs with every batch norm in evaluation mode."""
        return self._reference(*inputs)

    def __repr__(self) -> str:
        return f"FoldedModel({type(self.model).__name__}:\n{self.plan.format()})"


def _refuse_stacked(path, mean, info: NormInfo) -> None:
    """A norm whose statistics hold more than one call's features: stacked by a transform."""
    shape = tuple(np.shape(mean))
    if int(np.prod(shape)) == int(np.prod(info.features)):
        return
    where = info.transform or "a lifted transform (nn.scan, nn.vmap, nnx.scan, nnx.vmap)"
    raise ValueError(
        f"batch norm {path_str(path)!r} is inside {where}, which stacks its variables: its "
        f"running mean has shape {shape} for {info.features} features per call. fold_model "
        f"cannot fold a stacked layer (each step or member needs its own folded kernel); export "
        f"the model unfolded, e.g. bnjax.export.export_function(lambda x: model.apply("
        f"variables, x, train=False), x, out), or share its variables (variable_axes None)."
    )


def _norm_arrays(path, mean, var, scale, bias, info: NormInfo):
    _refuse_stacked(path, mean, info)
    _refuse(f"batch norm {path_str(path)!r}", _unfoldable(mean, var, scale, bias, info.epsilon))
    return {"mean": np.asarray(mean), "var": np.asarray(var)}


def _has_evaluation_mode(context) -> bool:
    """Whether an ``intercept_methods`` context is the ``__call__`` of a linen layer with running
    statistics (a batch norm, or a norm with a running variance such as EvoNorm-B0): the
    folded model and its reference run those in evaluation mode, with nothing written."""
    return is_linen_batch_norm_call(context) or (
        context.method_name == "__call__"
        and isinstance(context.module, LINEN_RUNNING_VARIANCE_NORMS)
    )


def _linen_kernel_maps(model, variables, inputs, kwargs) -> dict:
    """{layer path: kernel map} of the convs that reparametrize their kernel (weight
    standardization, centering), read from one shapes-only trace of the model."""
    maps = {}

    def recording(next_fun, args, call_kwargs, context):
        if context.method_name == "__call__":
            kernel_fn = kernel_map(context.module)
            if kernel_fn is not None:
                maps[tuple(context.module.path)] = kernel_fn
        if _has_evaluation_mode(context):
            return call_in_mode(
                next_fun, context.module, args, call_kwargs, use_running_average=True
            )
        return next_fun(*args, **call_kwargs)

    with nn.intercept_methods(recording):
        jax.eval_shape(lambda v, *xs: model.apply(v, *xs, **kwargs), variables, *inputs)
    return maps


def _linen(model, variables, inputs, kwargs) -> FoldedModel:
    check_no_conv_norms(variables.get(STATS, {}), "bnjax.lifecycle.fold_model")
    plan = trace_pairs(model, variables, *inputs, **kwargs)
    params, stats = to_dict(variables.get(PARAMS, {})), variables.get(STATS, {})
    # A standardized (or centered) conv's folded kernel is its mapped kernel times the norm's
    # gain; the folded model then runs every such conv on its stored kernel as is
    # (`stored_kernels`), so the unpaired ones store their mapped kernel too.
    for layer, kernel_fn in _linen_kernel_maps(model, variables, inputs, kwargs).items():
        layer_params = get_path(params, layer)
        set_path(params, layer, {**layer_params, "kernel": kernel_fn(layer_params["kernel"])})
    statistics, affines, added_bias = {}, {}, {}
    for norm, info in plan.norms.items():
        state, norm_params = get_path(stats, norm), get_path(params, norm, {})
        scale, bias = norm_params.get("scale"), norm_params.get("bias")
        statistics[norm] = _norm_arrays(norm, state["mean"], state["var"], scale, bias, info)
        if norm in plan.unfoldable:
            affines[norm] = evaluation_affine(
                state["mean"], state["var"], scale, bias, epsilon=info.epsilon
            )
            continue
        layer = plan.pairs[norm]
        layer_params = get_path(params, layer)
        kernel, new_bias = fold_into(
            layer_params["kernel"],
            layer_params.get("bias"),
            state["mean"],
            state["var"],
            scale,
            bias,
            epsilon=info.epsilon,
        )
        replaced = {**layer_params, "kernel": kernel}
        if "bias" in layer_params:
            replaced["bias"] = new_bias
        else:  # a layer built without a bias gets it added to its output
            added_bias[layer] = new_bias
        set_path(params, layer, replaced)
    folded_variables = {**variables, PARAMS: params} if PARAMS in variables else variables

    def folding(next_fun, args, call_kwargs, context):
        module, path = context.module, tuple(context.module.path)
        if context.method_name != "__call__":
            return next_fun(*args, **call_kwargs)
        if path in added_bias and isinstance(module, (nn.Conv, nn.Dense)):
            y = next_fun(*args, **call_kwargs)
            return y + added_bias[path].astype(y.dtype)
        if isinstance(module, LINEN_BATCH_NORMS):
            if path in plan.pairs:
                return args[0].astype(plan.norms[path].output_dtype)
            if path in affines:
                return _affine(args[0], *affines[path], plan.norms[path])
            return call_in_mode(next_fun, module, args, call_kwargs, use_running_average=True)
        if isinstance(module, LINEN_RUNNING_VARIANCE_NORMS):  # kept, in evaluation mode
            return call_in_mode(next_fun, module, args, call_kwargs, use_running_average=True)
        return next_fun(*args, **call_kwargs)

    def evaluating(next_fun, args, call_kwargs, context):
        if _has_evaluation_mode(context):
            return call_in_mode(
                next_fun, context.module, args, call_kwargs, use_running_average=True
            )
        return next_fun(*args, **call_kwargs)

    def call(*inputs):
        with stored_kernels(), nn.intercept_methods(folding):
            return model.apply(folded_variables, *inputs, **kwargs)

    def reference(*inputs):
        with nn.intercept_methods(evaluating):
            return model.apply(variables, *inputs, **kwargs)

    return FoldedModel(model, plan, statistics, call, reference)


def _folded_call(self, x, *args, **kwargs):
    """An nnx norm folded into the layer before it: the identity (in the norm's out dtype)."""
    return x.astype(type(self).folded_info.output_dtype)


def _affine_call(self, x, *args, **kwargs):
    """An nnx norm that cannot fold: its evaluation-mode affine map."""
    cls = type(self)
    return _affine(x, cls.folded_gain, cls.folded_shift, cls.folded_info)


def _replace_norm(module, role: str, call, **attributes) -> None:
    """Gives the nnx norm `module` a class of its own whose ``__call__`` is `call`.

    What the call needs is on the class, not the instance: nnx transforms (``nnx.remat``, ...)
    run copies of the module, which keep its class, and arrays on an instance would become
    nnx state.
    """
    base = original_class(type(module))
    namespace = {"__call__": call, "_bnjax_base": base, "__module__": __name__, **attributes}
    swap_class(module, type(f"{role}{base.__name__}", (type(module),), namespace))


def _evaluating_call(self, x, *args, **kwargs):
    if args:
        args = (True, *args[1:])
    else:
        kwargs = {**kwargs, "use_running_average": True}
    return call_parent(self, _evaluating_call, x, *args, **kwargs)


def _value(module, name):
    variable = getattr(module, name, None)
    return None if variable is None else read_variable(variable)


def _nnx(model, inputs, kwargs) -> FoldedModel:
    check_no_nnx_conv_norms(model, "bnjax.lifecycle.fold_model")
    plan = trace_pairs(model, *inputs, **kwargs)
    clone = nnx.clone(model)
    modules = {tuple(path): module for path, module in nnx.iter_modules(clone)}
    for module in modules.values():
        # A standardized (or centered) conv becomes a plain one holding its mapped kernel,
        # which a paired norm then scales like any kernel.
        if isinstance(module, nnx.Conv) and isinstance(module.promote_dtype, KernelFirst):
            mapping = module.promote_dtype
            masked = _value(module, "kernel")
            if module.mask is not None:
                masked = masked * jnp.asarray(module.mask, masked.dtype)
            write_variable(module.kernel, mapping.mapped(masked))
            module.promote_dtype = mapping.promote
    statistics = {}
    for norm, info in plan.norms.items():
        module = modules[norm]
        mean, var = _value(module, "mean"), _value(module, "var")
        scale, bias = _value(module, "scale"), _value(module, "bias")
        statistics[norm] = _norm_arrays(norm, mean, var, scale, bias, info)
        if norm in plan.unfoldable:
            gain, shift = evaluation_affine(mean, var, scale, bias, epsilon=info.epsilon)
            _replace_norm(
                module,
                "Affine",
                _affine_call,
                folded_gain=np.asarray(gain),
                folded_shift=np.asarray(shift),
                folded_info=info,
            )
            continue
        layer = modules[plan.pairs[norm]]
        layer_bias = _value(layer, "bias")
        kernel, new_bias = fold_into(
            _value(layer, "kernel"), layer_bias, mean, var, scale, bias, epsilon=info.epsilon
        )
        write_variable(layer.kernel, kernel)
        if layer_bias is None:  # nnx's Conv and Linear read `use_bias` as well as `bias`
            layer.bias, layer.use_bias = nnx.Param(new_bias), True
        else:
            write_variable(layer.bias, new_bias)
        _replace_norm(module, "Folded", _folded_call, folded_info=info)

    # Norms that are not affine in evaluation (plan.kept) run as they are, in evaluation mode.
    running_variance = [m for m in modules.values() if isinstance(m, NNX_RUNNING_VARIANCE_NORMS)]
    for module in running_variance:
        module.use_running_average = True
    # Both run functionally (merged at each call): a closed-over module that runs an nnx
    # transform (nnx.remat, ...) under jit would be updated from the wrong trace.
    folded_graph, folded_state = nnx.split(clone)
    norms = [
        *nnx_batch_norms(model).values(),
        *(m for _, m in nnx.iter_modules(model) if isinstance(m, NNX_RUNNING_VARIANCE_NORMS)),
    ]
    with swapped_classes(norms, lambda cls: subclass(cls, "Evaluating", _evaluating_call)):
        reference_graph, reference_state = nnx.split(model)

    def call(*inputs):
        return nnx.merge(folded_graph, folded_state, copy=True)(*inputs, **kwargs)

    def reference(*inputs):
        return nnx.merge(reference_graph, reference_state, copy=True)(*inputs, **kwargs)

    return FoldedModel(model, plan, statistics, call, reference)


def fold_model(model, *args, **kwargs) -> FoldedModel:
    """`model` in evaluation mode with every batch norm folded where the computation allows.

    linen: ``fold_model(model, variables, *inputs, **apply_kwargs)``; nnx:
    ``fold_model(model, *inputs, **call_kwargs)``. The inputs (arrays or
    ``jax.ShapeDtypeStruct``s: only their shapes are traced) and keywords are those of an
    evaluation call (``train=False``); batch norms are forced into evaluation mode either way.
    The result takes inputs of any batch size.

    Raises ValueError naming the layer when a norm's statistics are missing, non-finite or
    negative, or its epsilon is invalid, and naming the transform when a lifted transform
    stacks the norm's variables (nothing is folded then). A model without batch norm is
    returned as it is, with an empty plan.

    Example (nnx; the linen example is in the module docstring):
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.proj = nnx.Linear(3, 4, rngs=rngs)
      ...         self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.norm(self.proj(x))
      >>> folded = fold_model(Net(nnx.Rngs(0)), jnp.ones((2, 3)))
      >>> folded.plan.pairs, folded(jnp.ones((5, 3))).shape
      ({('norm',): ('proj',)}, (5, 4))
    """
    if isinstance(model, nnx.Module):
        return _nnx(model, args, kwargs)
    if isinstance(model, nn.Module):
        if not args or not hasattr(args[0], "keys"):
            raise TypeError("fold_model(linen_model, variables, *inputs): `variables` missing.")
        # Statistics missing for a norm the model calls are refused while tracing, naming it;
        # a model without batch norm needs none.
        return _linen(model, args[0], args[1:], kwargs)
    raise TypeError(f"`model` must be a flax linen or nnx Module, got {type(model).__name__}.")
