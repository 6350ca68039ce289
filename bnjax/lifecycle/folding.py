"""Fold evaluation-mode batch norm into the convolution or dense layer before it.

In evaluation a batch norm is an affine map per output channel c,

    BN(z)_c = g_c * (z_c - mean_c) + beta_c,      g_c = scale_c / sqrt(var_c + epsilon),

and the layer before it is linear, ``z = x * W + b`` (W: (..., C_in, C) for Conv and Dense,
b = 0 when it has none), so their composition is one layer with

    W'[..., c] = W[..., c] * g_c,                  b'_c = (b_c - mean_c) * g_c + beta_c.

`fold` applies this to every (layer, norm) pair of a linen variables tree and returns params
for the same model built with ``norm='none'`` (whose convolutions and dense layers carry a
bias): serving then skips the norm's memory pass, and the two models agree in evaluation mode to
float32 rounding. The pairs of the bundled models are found by name: a norm ``norm{i}`` /
``stem_norm`` / ``shortcut_norm`` follows the sibling ``conv{i}`` or ``dense{i}`` /
``stem_conv`` / ``shortcut_conv``; pass `pairs` for other naming schemes. Only a norm over the
last axis (channels last) that directly follows a Conv or Dense can be folded.

For any linen or nnx model of your own, `bnjax.lifecycle.fold_model` pairs the layers from the
traced computation instead (`bnjax.lifecycle.pairing`) and keeps unfoldable norms as their
`evaluation_affine` map; `pairs=trace_pairs(model, variables, x, train=False).pairs` gives
`fold` the same pairs. For the functional core, `fold_into` folds one pair of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.core.checks import known_values
from bnjax.lifecycle.layers import (
    PARAMS,
    STATS,
    Path,
    check_no_conv_norms,
    get_path,
    is_linen_batch_norm_call,
    path_str,
    set_path,
    stats_layer_paths,
    to_dict,
)

__all__ = ["evaluation_affine", "fold", "fold_into", "layer_epsilons", "pair_by_name"]


def _unfoldable(mean, var, scale, norm_bias, epsilon) -> list[str]:
    """Why a norm's statistics or epsilon would fold into garbage (values known only)."""
    problems = []
    try:
        eps = float(epsilon)
    except (TypeError, jax.errors.ConcretizationTypeError):
        eps = None  # traced
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        problems.append(f"epsilon is {epsilon!r} (it must be finite and >= 0)")
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("bias", norm_bias)):
        (array,) = known_values(value) or (None,)
        if array is not None and not np.all(np.isfinite(array)):
            problems.append(f"{name} non-finite in {int(np.sum(~np.isfinite(array)))} channel(s)")
    (var,) = known_values(var) or (None,)
    if var is not None and np.any(var < 0):
        problems.append(
            f"negative var in {int(np.sum(var < 0))} channel(s) (min {np.nanmin(var):.3g})"
        )
    elif var is not None and eps is not None and eps >= 0 and np.any(var + eps == 0):
        problems.append(f"var + epsilon is 0 in {int(np.sum(var + eps == 0))} channel(s)")
    return problems


def _refuse(where: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(
            f"{where}: {'; '.join(problems)}. Folding would produce non-finite weights; "
            f"fix the statistics (recalibrate; validate_statistics finds such layers) or the "
            f"epsilon first."
        )


def evaluation_affine(mean, var, scale=None, bias=None, *, epsilon: float = 1e-5):
    """(gain, shift): evaluation-mode batch norm as the affine map ``y = x * gain + shift``.

    Per feature, ``gain = scale / sqrt(var + epsilon)`` and ``shift = bias - mean * gain``
    (float32 or wider; shapes of `mean`). Raises ValueError as `fold_into` does.

    Example:
      >>> gain, shift = evaluation_affine(jnp.array([1.0]), jnp.array([4.0]), epsilon=0.0)
      >>> gain.tolist(), shift.tolist()               # (x - 1) / 2
      ([0.5], [-0.5])
    """
    _refuse("evaluation_affine", _unfoldable(mean, var, scale, bias, epsilon))
    dtype = jnp.promote_types(jnp.asarray(mean).dtype, jnp.float32)
    gain = jax.lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
    if scale is not None:
        gain = gain * jnp.asarray(scale, dtype)
    shift = -jnp.asarray(mean, dtype) * gain
    if bias is not None:
        shift = shift + jnp.asarray(bias, dtype)
    return gain, shift


def fold_into(kernel, bias, mean, var, scale=None, norm_bias=None, *, epsilon: float = 1e-5):
    """(kernel', bias') of the layer equal to ``layer`` then evaluation-mode batch norm.

    Args:
      kernel: (..., C) with the output channels last (Conv (kh, kw, C_in, C), Dense (D, C)),
        floating; any array-like (a nested list is taken as an array).
      bias: (C,) or None (no bias). mean, var: (C,) running statistics of the norm.
      scale, norm_bias: (C,) norm parameters, None for 1 and 0. epsilon: the norm's.

    Raises TypeError for a kernel that is not floating, ValueError for a negative or
    non-finite variance, non-finite mean/scale/bias, a negative or non-finite epsilon, or
    var + epsilon = 0 (checked where the values are known: not for arrays traced under jit).

    Example:
      >>> kernel, bias = fold_into(jnp.ones((2, 1)), None, jnp.array([1.0]), jnp.array([4.0]),
      ...                          epsilon=0.0)
      >>> kernel.ravel().tolist(), bias.tolist()      # (x1 + x2 - 1) / 2
      ([0.5, 0.5], [-0.5])
    """
    kernel = jnp.asarray(kernel)  # a nested list folds as the array it spells
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f"`kernel` has dtype {kernel.dtype}: the folded kernel keeps the kernel's dtype, "
            "and scaled by the norm's gain it would be rounded; pass a floating kernel"
        )
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    channels = kernel.shape[-1]
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("norm_bias", norm_bias)):
        if value is not None and tuple(jnp.shape(value)) != (channels,):
            raise ValueError(
                f"`{name}` has shape {tuple(jnp.shape(value))}; the kernel's {channels} output "
                f"channels (its last axis) need ({channels},). Only a norm over the channels of "
                f"the layer right before it can be folded."
            )
    _refuse("fold_into", _unfoldable(mean, var, scale, norm_bias, epsilon))
    gain = jax.lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
    if scale is not None:
        gain = gain * jnp.asarray(scale, dtype)
    shift = -jnp.asarray(mean, dtype) if bias is None else jnp.asarray(bias, dtype) - mean
    new_bias = shift * gain
    if norm_bias is not None:
        new_bias = new_bias + jnp.asarray(norm_bias, dtype)
    new_kernel = (jnp.asarray(kernel, dtype) * gain).astype(kernel.dtype)
    bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
    return new_kernel, new_bias.astype(bias_dtype)


def pair_by_name(variables) -> dict[Path, Path]:
    """{norm_path: layer_path} by the bundled models' naming (see the module docstring).

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2)
      >>> pair_by_name(model.init(jax.random.key(0), jnp.ones((2, 3)), train=False))
      {('norm0',): ('dense0',)}
    """
    params = variables[PARAMS]
    pairs = {}
    for path in stats_layer_paths(variables[STATS]):
        parent, name = path[:-1], str(path[-1])
        for layer in (name.replace("norm", "conv"), name.replace("norm", "dense")):
            sibling = get_path(params, (*parent, layer))
            if layer != name and isinstance(sibling, Mapping) and "kernel" in sibling:
                pairs[path] = (*parent, layer)
                break
    return pairs


def _as_path(path) -> Path:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def layer_epsilons(model: nn.Module, variables, *inputs, **apply_kwargs) -> dict[Path, float]:
    """{norm_path: epsilon} read from the modules of ``model.apply(variables, *inputs, ...)``.

    Only traces the model (``jax.eval_shape``), nothing is computed.

    Example:
      >>> from bnjax import models
      >>> model = models.MLP(features=(4,), num_classes=2, norm_options={"epsilon": 1e-3})
      >>> x = jnp.ones((2, 3))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> layer_epsilons(model, variables, x, train=False)        # pass to fold(epsilon=...)
      {('norm0',): 0.001}
    """
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        if is_linen_batch_norm_call(context):
            found[tuple(context.module.path)] = float(context.module.epsilon)
        return next_fun(*args, **kwargs)

    def run(variables, *inputs):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *inputs, mutable=True, **apply_kwargs)

    jax.eval_shape(run, variables, *inputs)
    return found


def fold(variables, *, epsilon: float | Mapping = 1e-5, pairs: Mapping | None = None) -> dict:
    """Params of the norm-free model equal (in evaluation) to `variables`' model.

    Args:
      variables: linen variables with 'params' and 'batch_stats' (the running statistics
        are what evaluation uses; recalibrate first if they are stale).
      epsilon: every norm's epsilon, or {norm_path: epsilon} (paths as tuples or 'a/b'
        strings), e.g. from ``layer_epsilons(model, variables, x, train=False)``.
      pairs: {norm_path: layer_path}; default `pair_by_name`. Every batch norm must be paired.

    Raises ValueError naming the layer when its statistics would fold into garbage (negative
    or non-finite variance, non-finite mean, scale or bias, var + epsilon = 0) or its epsilon
    is negative or not finite; nothing is folded then.

    Returns:
      ``{'params': ...}`` for the same architecture with ``norm='none'``: each paired layer
      has 'kernel' and 'bias', the norms' parameters are gone, and there is no 'batch_stats'.

    Example:
      >>> from bnjax import models
      >>> model = models.SmallCNN(features=(4,))
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> folded = fold(model.init(jax.random.key(0), x, train=False))
      >>> sorted(folded["params"]["conv0"]), "norm0" in folded["params"]
      (['bias', 'kernel'], False)
    """
    check_no_conv_norms(variables.get(STATS, {}), "bnjax.lifecycle.fold")
    if STATS not in variables or PARAMS not in variables:
        raise ValueError("`variables` needs 'params' and 'batch_stats' (the full model.init tree).")
    pairs = (
        pair_by_name(variables)
        if pairs is None
        else {_as_path(norm): _as_path(layer) for norm, layer in pairs.items()}
    )
    norms = stats_layer_paths(variables[STATS])
    unpaired = [path_str(p) for p in norms if p not in pairs]
    if unpaired:
        raise ValueError(
            f"No Conv/Dense layer found by name before the batch norm(s) {unpaired}. For a "
            f"model of your own, fold from the traced computation: "
            f"bnjax.lifecycle.fold_model(model, variables, x, train=False) (or pass "
            f"pairs=bnjax.lifecycle.trace_pairs(model, variables, x, train=False).pairs here, "
            f"or `pairs` {{norm_path: layer_path}} by hand). A norm after an addition or a "
            f"pooling cannot be folded."
        )
    if isinstance(epsilon, Mapping):
        epsilon = {_as_path(path): value for path, value in epsilon.items()}
    params = to_dict(variables[PARAMS])
    for norm, layer in pairs.items():
        statistics = get_path(variables[STATS], norm)
        norm_params = get_path(params, norm, {})
        layer_params = get_path(params, layer)
        if not isinstance(layer_params, Mapping) or "kernel" not in layer_params:
            raise ValueError(
                f"`pairs` maps {path_str(norm)} to {path_str(layer)}, which "
                f"has no 'kernel' in params."
            )
        eps = epsilon.get(norm) if isinstance(epsilon, Mapping) else epsilon
        if eps is None:
            raise ValueError(f"`epsilon` has no entry for {path_str(norm)}.")
        _refuse(
            f"batch norm {path_str(norm)!r}",
            _unfoldable(
                statistics["mean"],
                statistics["var"],
                norm_params.get("scale"),
                norm_params.get("bias"),
                eps,
            ),
        )
        kernel, bias = fold_into(
            layer_params["kernel"],
            layer_params.get("bias"),
            statistics["mean"],
            statistics["var"],
            norm_params.get("scale"),
            norm_params.get("bias"),
            epsilon=eps,
        )
        set_path(params, layer, {**layer_params, "kernel": kernel, "bias": bias})
        if get_path(params, norm) is not None:
            parent = get_path(params, norm[:-1]) if norm[:-1] else params
            del parent[norm[-1]]
    return {PARAMS: params}
