"""Parity of bnjax.linen and bnjax.nnx with flax's own normalization modules.

For BatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm and their options (one
parametrized case each), against flax.linen and flax.nnx:

- the variables: linen ``init`` gives the same collections, names, shapes and dtypes; nnx
  ``nnx.state`` has the same paths and variable types (``nnx.split(model, nnx.Param,
  nnx.BatchStat)`` leaves nothing over), and ``track_counters=True`` only adds count/skipped;
- the numbers: outputs and updated batch_stats of a training call, outputs in evaluation, and
  gradients of a scalar loss w.r.t. the params and the input;
- ``axis_name`` under ``jax.vmap(..., axis_name=...)``: BatchNorm equals flax's BatchNorm with
  the same axis_name, and the per-example norms, with their reduction axis split across the
  mapped axis, equal flax on the unsplit array;
- the flax workflows: nnx split/merge, ``model.eval()``, an identity ``promote_dtype`` (bitwise
  bnjax.linen), and a linen TrainState step with ``mutable=['batch_stats']``.

flax runs with ``use_fast_variance=False`` (bnjax's statistics are always exact two-pass float32),
except in the cases named ``fast-variance``, whose data suit the one-pass formula. The documented
deliberate differences (see bnjax/linen/__init__.py) are avoided, or checked as such. Nothing is
fetched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import bnjax.linen as bnl
import bnjax.nnx as bnx

SHAPE = (4, 3, 2, 32)  # (N, H, W, C) unless a case says otherwise: one shape, few compilations
# (C = 32: flax's default GroupNorm has 32 groups)
SHAPE_5D = (2, 3, 2, 2, 4)
KEY = jax.random.key(0)
F32_TOL = 1e-5
HALF_TOL = {jnp.float16: 5e-3, jnp.bfloat16: 3e-2}
EXACT_FLAX = {"use_fast_variance": False}  # flax's two-pass statistics, as bnjax's
HAS_RUNNING_STATS = ("BatchNorm",)


@dataclasses.dataclass(frozen=True)
class Case:
    """One module with one option set, and the input it is checked on."""

    module: str  # class name, the same in flax.linen, flax.nnx, bnjax.linen and bnjax.nnx
    options: dict = dataclasses.field(default_factory=dict)  # flax's field/argument names
    shape: tuple = SHAPE
    x_dtype: Any = jnp.float32
    mask: str | None = None  # a key of MASK_BUILDERS
    tol: float = F32_TOL
    exact_flax: bool = True  # flax with use_fast_variance=False
    call_arg: bool = False  # BatchNorm: use_running_average as a call argument, not a field
    nnx_features: Any = None  # bnjax.nnx num_features where flax.nnx cannot express the case
    nnx_reference: str = "nnx"  # "linen": flax.nnx is wrong or fails here, compare with linen


def _sparse_mask(shape) -> jax.Array:
    """About 80% True; along any axis whose stride is not a multiple of 5 (all of them here),
    at most one False in each run of up to 5 values, so every statistic keeps valid values."""
    index = np.arange(math.prod(shape)).reshape(shape)
    return jnp.asarray(index * 7 % 5 != 0)


def _per_example_mask(shape) -> jax.Array:
    """flax's per-example mask: mask[:, None, ...] with examples 0, 2, 3 kept."""
    keep = np.arange(shape[0]) != 1
    return jnp.asarray(keep.reshape((shape[0],) + (1,) * (len(shape) - 1)))


MASK_BUILDERS = {
    "elementwise": _sparse_mask,
    "per-example": _per_example_mask,
    # (W, C), broadcast over N and H: every feature keeps most of its values
    "trailing": lambda shape: _sparse_mask(shape[-2:]),
    # (C,): every fifth feature left out of statistics over C (in BatchNorm: no value left)
    "feature": lambda shape: _sparse_mask(shape[-1:]),
}


BATCH_NORM_CASES = {
    "bn-default": Case("BatchNorm"),
    "bn-axis-1": Case("BatchNorm", {"axis": 1}),
    "bn-axis-1-2": Case(
        "BatchNorm",
        {"axis": (1, 2)},
        nnx_features=(3, 2),  # flax.nnx.BatchNorm fails on several axes: compare with linen
        nnx_reference="linen",
    ),
    "bn-momentum": Case("BatchNorm", {"momentum": 0.5}),
    "bn-epsilon": Case("BatchNorm", {"epsilon": 0.1}),
    "bn-no-bias": Case("BatchNorm", {"use_bias": False}),
    "bn-no-scale": Case("BatchNorm", {"use_scale": False}),
    "bn-no-affine": Case("BatchNorm", {"use_bias": False, "use_scale": False}),
    "bn-float16": Case("BatchNorm", {"dtype": jnp.float16}, tol=HALF_TOL[jnp.float16]),
    "bn-bfloat16": Case("BatchNorm", {"dtype": jnp.bfloat16}, tol=HALF_TOL[jnp.bfloat16]),
    "bn-x-bfloat16": Case("BatchNorm", x_dtype=jnp.bfloat16, tol=HALF_TOL[jnp.bfloat16]),
    "bn-param-float16": Case("BatchNorm", {"param_dtype": jnp.float16}, tol=HALF_TOL[jnp.float16]),
    "bn-mask-elementwise": Case("BatchNorm", mask="elementwise"),
    "bn-mask-per-example": Case("BatchNorm", mask="per-example"),
    "bn-mask-trailing": Case("BatchNorm", mask="trailing"),
    "bn-complex64": Case("BatchNorm", {"dtype": jnp.complex64}, x_dtype=jnp.complex64),
    "bn-call-arg": Case("BatchNorm", call_arg=True),
    "bn-fast-variance": Case("BatchNorm", exact_flax=False, tol=1e-4),
}

LAYER_NORM_CASES = {
    "ln-default": Case("LayerNorm"),
    "ln-reduce-1": Case("LayerNorm", {"reduction_axes": 1}),
    "ln-reduce-1-2": Case("LayerNorm", {"reduction_axes": (1, 2)}),
    "ln-reduce-0-1-2": Case("LayerNorm", {"reduction_axes": (0, 1, 2)}),
    "ln-features-1-2": Case("LayerNorm", {"reduction_axes": (1, 2, 3), "feature_axes": (1, 2)}),
    "ln-no-bias": Case("LayerNorm", {"use_bias": False}),
    "ln-bfloat16": Case("LayerNorm", {"dtype": jnp.bfloat16}, tol=HALF_TOL[jnp.bfloat16]),
    "ln-mask-elementwise": Case("LayerNorm", mask="elementwise"),
    "ln-mask-feature": Case("LayerNorm", mask="feature"),
    "ln-fast-variance": Case("LayerNorm", exact_flax=False, tol=1e-4),
}

RMS_NORM_CASES = {
    "rms-default": Case("RMSNorm"),
    "rms-reduce-1": Case("RMSNorm", {"reduction_axes": 1}),
    "rms-reduce-1-2-3": Case("RMSNorm", {"reduction_axes": (1, 2, 3)}),
    "rms-no-scale": Case("RMSNorm", {"use_scale": False}),
    "rms-float16": Case("RMSNorm", {"dtype": jnp.float16}, tol=HALF_TOL[jnp.float16]),
    "rms-mask-elementwise": Case("RMSNorm", mask="elementwise"),
    "rms-mask-feature": Case("RMSNorm", mask="feature"),
}

GROUP_NORM_CASES = {
    "gn-default-32-groups": Case("GroupNorm"),
    "gn-2-groups": Case("GroupNorm", {"num_groups": 2}),
    # group_size 16 = 2 groups: the same programs as gn-2-groups, so it compiles nothing new
    "gn-group-size-16": Case("GroupNorm", {"num_groups": None, "group_size": 16}),
    "gn-unbatched-5d": Case(
        "GroupNorm", {"num_groups": 2, "reduction_axes": (0, 1, 3, 4)}, shape=SHAPE_5D
    ),
    "gn-last-3-axes-5d": Case(
        "GroupNorm",
        {"num_groups": 2, "reduction_axes": (-3, -2, -1)},
        shape=SHAPE_5D,
        # flax.nnx.GroupNorm repeats the group statistics along axis 1 instead of the last
        # axis, which is wrong when axis 1 is not reduced: compare with flax.linen there.
        nnx_reference="linen",
    ),
    "gn-bfloat16": Case(
        "GroupNorm", {"num_groups": 2, "dtype": jnp.bfloat16}, tol=HALF_TOL[jnp.bfloat16]
    ),
    "gn-mask-elementwise": Case("GroupNorm", {"num_groups": 2}, mask="elementwise"),
}

INSTANCE_NORM_CASES = {
    "in-default": Case("InstanceNorm"),
    "in-features-1-2": Case("InstanceNorm", {"feature_axes": (1, 2)}),
    "in-features-1-last": Case(
        "InstanceNorm",
        {"feature_axes": (1, -1)},
        # Statistics over W = 2 values: the output is +-1 up to epsilon, and the gradient
        # w.r.t. x (~1e-4) is what is left of a cancellation, good to ~1e-5 absolute.
        tol=1e-4,
    ),
    "in-no-scale": Case("InstanceNorm", {"use_scale": False}),
    "in-mask-elementwise": Case("InstanceNorm", mask="elementwise"),
}

CASES = {
    **BATCH_NORM_CASES,
    **LAYER_NORM_CASES,
    **RMS_NORM_CASES,
    **GROUP_NORM_CASES,
    **INSTANCE_NORM_CASES,
}


def _params(cases: dict) -> list:
    """pytest params with the case names as ids."""
    return [pytest.param(case, id=name) for name, case in cases.items()]


# --- inputs and comparisons ---------------------------------------------------------------------


def _normal(shape, seed: int, loc: float = 0.0, scale: float = 1.0, dtype=np.float32):
    """Normal samples made by numpy: no XLA program to compile for each new shape."""
    samples = np.random.default_rng(seed).normal(loc, scale, shape)
    return jnp.asarray(samples.astype(np.float32).astype(dtype))


def _input(case: Case) -> jax.Array:
    """Data with a nonzero mean, so that the mean subtraction matters."""
    x = np.asarray(_normal(case.shape, 1, loc=2.0, scale=3.0))
    if jnp.issubdtype(case.x_dtype, jnp.complexfloating):
        x = x + 1j * np.asarray(_normal(case.shape, 2, loc=-1.0, scale=2.0))
    return jnp.asarray(x.astype(case.x_dtype))


def _mask(case: Case) -> jax.Array | None:
    return None if case.mask is None else MASK_BUILDERS[case.mask](case.shape)


def _scalar_loss(y: jax.Array, weights: jax.Array) -> jax.Array:
    """A weighted sum of the output (real and imaginary parts), for the gradients."""
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    if jnp.iscomplexobj(y):
        return jnp.sum(jnp.real(y) * weights) + jnp.sum(jnp.imag(y) * weights[::-1])
    return jnp.sum(y * weights)


def _loss_weights(shape) -> jax.Array:
    return _normal(shape, 3)


def _shapes_and_dtypes(tree):
    return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree)


def _assert_close(actual, expected, tol: float) -> None:
    """Same tree structure, shapes and dtypes; values within `tol` (rtol and atol)."""
    assert _shapes_and_dtypes(actual) == _shapes_and_dtypes(expected)
    chex.assert_trees_all_close(
        jax.tree.map(_widened, actual), jax.tree.map(_widened, expected), rtol=tol, atol=tol
    )


def _widened(a) -> np.ndarray:
    """A numpy copy in float32 at least (half precision rounds at `tol` scale anyway)."""
    a = np.asarray(a)
    return a.astype(np.promote_types(a.dtype, np.float32))


def _flax_options(case: Case) -> dict:
    return {**case.options, **(EXACT_FLAX if case.exact_flax else {})}


def _mode(case: Case, training: bool) -> tuple[dict, dict]:
    """(linen fields, call keywords) that select training or evaluation for this case."""
    if case.module not in HAS_RUNNING_STATS:
        return {}, {}
    if case.call_arg:
        return {}, {"use_running_average": not training}
    return {"use_running_average": not training}, {}


def _randomized_params(params: dict) -> dict:
    """Params replaced by random values around 1, of the same shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    new = [_normal(a.shape, 10 + i, 1.0, 0.5, a.dtype) for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, new)


def _randomized_variables(module, x, **call) -> dict:
    """flax's init of `module`, with random params."""
    variables = module.init(KEY, x, **call)
    if "params" in variables:
        variables = {**variables, "params": _randomized_params(variables["params"])}
    return variables


# --- linen ------------------------------------------------------------------------------------


def _linen_module(namespace, case: Case, training: bool, **extra) -> nn.Module:
    fields, _ = _mode(case, training)
    return getattr(namespace, case.module)(**_flax_options(case), **fields, **extra)


def _linen_run(module, variables, x, mask, call: dict, training: bool):
    """(output, updated batch_stats or {}) of one call, training updates kept."""
    if training and "batch_stats" in variables:
        y, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"], **call)
        return y, updates["batch_stats"]
    return module.apply(variables, x, mask=mask, **call), {}


def _linen_step(module, variables, x, mask, call: dict, training: bool):
    """(output, updated batch_stats or {}, gradients of the scalar loss w.r.t. params and x)."""
    weights = _loss_weights(x.shape)

    def loss(params, x):
        y, stats = _linen_run(module, {**variables, "params": params}, x, mask, call, training)
        return _scalar_loss(y, weights), (y, stats)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (y, stats)), grads = grad(variables.get("params", {}), x)
    return y, stats, grads


def _linen_results(namespace, case: Case, variables, x, mask) -> dict:
    """Training output, batch_stats and gradients, then evaluation output and gradients."""
    results = {}
    for training in (True, False):
        module = _linen_module(namespace, case, training)
        _, call = _mode(case, training)
        y, stats, grads = _linen_step(module, variables, x, mask, call, training)
        results["train" if training else "eval"] = (y, stats, grads)
        if stats:  # evaluate on the statistics this training call stored
            variables = {**variables, "batch_stats": stats}
        if case.module not in HAS_RUNNING_STATS:
            break  # no evaluation mode
    return results


@pytest.mark.parametrize("case", _params(CASES))
def test_linen_variables_match_flax(case):
    """flax's usual init on one example: same collections, names, shapes and dtypes."""
    x = jnp.ones((1, *case.shape[1:]), case.x_dtype)
    _, call = _mode(case, training=False)

    def variables(namespace):  # shapes and dtypes only (jax.eval_shape): nothing to compute
        init = _linen_module(namespace, case, False).init
        return jax.eval_shape(lambda key, x: init(key, x, **call), KEY, x)

    flax_vars, bnjax_vars = variables(nn), variables(bnl)
    assert _shapes_and_dtypes(bnjax_vars) == _shapes_and_dtypes(flax_vars)
    assert _param_count(bnjax_vars) == _param_count(flax_vars)  # what nn.tabulate reports


def _param_count(variables) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(variables.get("params", {})))


@pytest.mark.parametrize("case", _params(CASES))
def test_linen_outputs_stats_and_gradients_match_flax(case):
    x, mask = _input(case), _mask(case)
    _, call = _mode(case, training=True)
    variables = _randomized_variables(_linen_module(nn, case, True), x, mask=mask, **call)
    expected = _linen_results(nn, case, variables, x, mask)
    actual = _linen_results(bnl, case, variables, x, mask)
    _assert_close(actual, expected, case.tol)


def test_linen_track_counters_only_adds_count_and_skipped():
    case = CASES["bn-default"]
    x = _input(case)
    plain = _linen_module(bnl, case, training=True).init(KEY, x)
    counted = _linen_module(bnl, case, training=True, track_counters=True).init(KEY, x)
    extra = {k: v for k, v in counted["batch_stats"].items() if k not in plain["batch_stats"]}
    assert _shapes_and_dtypes(extra) == {"count": ((), jnp.int32), "skipped": ((), jnp.int32)}
    without_extra = {
        **counted,
        "batch_stats": {k: counted["batch_stats"][k] for k in plain["batch_stats"]},
    }
    assert _shapes_and_dtypes(without_extra) == _shapes_and_dtypes(plain)
    y, updates = _linen_module(bnl, case, training=True, track_counters=True).apply(
        counted, x, mutable=["batch_stats"]
    )
    expected_y, expected_updates = _linen_module(nn, case, training=True).apply(
        plain, x, mutable=["batch_stats"]
    )
    _assert_close(y, expected_y, F32_TOL)
    assert int(updates["batch_stats"]["count"]) == 1
    _assert_close(
        {k: updates["batch_stats"][k] for k in ("mean", "var")},
        expected_updates["batch_stats"],
        F32_TOL,
    )


def test_linen_fully_masked_feature_gives_the_bias_where_flax_gives_nan():
    """The documented difference: a statistic with no valid value; other features agree."""
    case = Case("BatchNorm", mask="feature")  # a (C,) mask: False features have no value
    x, mask = _input(case), _mask(case)
    masked = ~np.asarray(mask)
    variables = _randomized_variables(nn.BatchNorm(use_running_average=False), x)
    module = nn.BatchNorm(use_running_average=False, **EXACT_FLAX)
    expected, _ = _linen_run(module, variables, x, mask, {}, training=True)
    module = bnl.BatchNorm(use_running_average=False)
    actual, stats = _linen_run(module, variables, x, mask, {}, training=True)
    assert masked.any() and bool(jnp.isnan(expected[..., masked]).all())
    bias = variables["params"]["bias"][masked]
    np.testing.assert_array_equal(
        actual[..., masked], jnp.broadcast_to(bias, x.shape[:-1] + bias.shape)
    )
    _assert_close(actual[..., ~masked], expected[..., ~masked], F32_TOL)
    assert bool(jnp.isfinite(stats["mean"]).all() and jnp.isfinite(stats["var"]).all())


# --- nnx --------------------------------------------------------------------------------------


def _feature_axes(case: Case, ndim: int) -> tuple[int, ...]:
    if case.module == "BatchNorm":
        axes = case.options.get("axis", -1)
    elif case.module == "GroupNorm":
        axes = -1
    else:
        axes = case.options.get("feature_axes", -1)
    axes = axes if isinstance(axes, tuple) else (axes,)
    return tuple(sorted(a % ndim for a in axes))


def _flax_num_features(case: Case) -> int:
    """flax.nnx's num_features: one int, the size of the feature axes."""
    return math.prod(case.shape[a] for a in _feature_axes(case, len(case.shape)))


def _nnx_model(namespace, case: Case, **extra) -> nnx.Module:
    """The module built the flax.nnx way (bnjax: `nnx_features` where flax cannot do it)."""
    features = _flax_num_features(case)
    if namespace is bnx and case.nnx_features is not None:
        features = case.nnx_features
    fields, _ = _mode(case, training=True)
    if namespace is nnx and case.module in HAS_RUNNING_STATS and "dtype" in case.options:
        extra = {"promote_dtype": _promote_all_but_running_stats, **extra}
    return getattr(namespace, case.module)(
        features, **_flax_options(case), **fields, **extra, rngs=nnx.Rngs(0)
    )


def _promote_all_but_running_stats(args, *, dtype=None, **kw):
    """flax.nnx.BatchNorm's promote_dtype, but mean and var kept float32: bnjax's documented
    nnx behaviour (flax's default also casts the running statistics to `dtype`)."""
    x, mean, var, scale, bias = args
    x, scale, bias = nnx.nn.dtypes.promote_dtype((x, scale, bias), dtype=dtype, **kw)
    return x, mean, var, scale, bias


def _nnx_variables(model: nnx.Module) -> dict:
    """{path: (variable type, shape, dtype)} of everything in the model's state."""
    return {
        path: (type(variable), jnp.shape(variable[...]), jnp.result_type(variable[...]))
        for path, variable in nnx.to_flat_state(nnx.state(model))
    }


def _linen_variables_as_nnx(case: Case) -> dict:
    """flax.linen's variables in nnx form, for cases flax.nnx cannot express."""
    x = jnp.ones(case.shape, case.x_dtype)
    init = _linen_module(nn, case, training=True).init
    variables = jax.eval_shape(lambda key, x: init(key, x, **_mode(case, True)[1]), KEY, x)
    kinds = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
    return {
        (name,): (kinds[collection], a.shape, a.dtype)
        for collection, names in variables.items()
        for name, a in names.items()
    }


def _nnx_eval_call(case: Case, model: nnx.Module) -> dict:
    """Switches the model to evaluation (model.eval() or the call argument)."""
    if case.module not in HAS_RUNNING_STATS:
        return {}
    if case.call_arg:
        return {"use_running_average": True}
    model.eval()
    return {}


def _nnx_step(model: nnx.Module, x, mask, call: dict):
    """(output, new BatchStat values, gradients w.r.t. params and x) of one functional call."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = _loss_weights(x.shape)

    def loss(params, x, rest):  # copy=True: Variables of this trace, free to update
        merged = nnx.merge(graphdef, params, rest, copy=True)
        y = merged(x, mask=mask, **call)
        return _scalar_loss(y, weights), (y, nnx.state(merged, nnx.BatchStat))

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (y, stats)), grads = grad(params, x, rest)
    return y, nnx.to_pure_dict(stats), (nnx.to_pure_dict(grads[0]), grads[1])


def _set_batch_stats(model: nnx.Module, stats: dict) -> None:
    for name, value in stats.items():
        getattr(model, name)[...] = value


def _nnx_results(model: nnx.Module, case: Case, x, mask) -> dict:
    """Training output, stats and gradients, then (BatchNorm) the same in evaluation, starting
    from the statistics training stored."""
    train_call = {"use_running_average": False} if case.call_arg else {}
    y, stats, grads = _nnx_step(model, x, mask, train_call)
    results = {"train": (y, stats, grads)}
    if case.module in HAS_RUNNING_STATS:
        _set_batch_stats(model, stats)
        y, kept_stats, grads = _nnx_step(model, x, mask, _nnx_eval_call(case, model))
        chex.assert_trees_all_equal(kept_stats, stats)  # evaluation leaves them alone
        results["eval"] = (y, {}, grads)
    return results


def _linen_reference_for_nnx(model: nnx.Module, case: Case, x, mask) -> dict:
    """flax.linen's results with the nnx model's variables, in _nnx_results' form."""
    state = nnx.to_pure_dict(nnx.state(model))
    variables = {"params": {k: state[k] for k in ("scale", "bias") if k in state}}
    if case.module in HAS_RUNNING_STATS:
        variables["batch_stats"] = {"mean": state["mean"], "var": state["var"]}
    return {
        mode: (y, stats, (grads[0], grads[1]))
        for mode, (y, stats, grads) in _linen_results(nn, case, variables, x, mask).items()
    }


@pytest.mark.parametrize("case", _params(CASES))
def test_nnx_state_matches_flax(case):
    bnjax_model = _nnx_model(bnx, case)
    if case.nnx_reference == "linen" and case.nnx_features is not None:
        expected = _linen_variables_as_nnx(case)
    else:
        expected = _nnx_variables(_nnx_model(nnx, case))
    assert _nnx_variables(bnjax_model) == expected
    if case.nnx_reference == "nnx":  # and flax's initial values
        flax_state = nnx.to_pure_dict(nnx.state(_nnx_model(nnx, case)))
        chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(bnjax_model)), flax_state)
    nnx.split(bnjax_model, nnx.Param, nnx.BatchStat)  # no remainder: raises otherwise


@pytest.mark.parametrize("case", _params(CASES))
def test_nnx_outputs_stats_and_gradients_match_flax(case):
    x, mask = _input(case), _mask(case)
    bnjax_model = _nnx_model(bnx, case)
    nnx.update(bnjax_model, _randomized_params(nnx.state(bnjax_model, nnx.Param)))
    if case.nnx_reference == "linen":
        expected = _linen_reference_for_nnx(bnjax_model, case, x, mask)
    else:
        flax_model = _nnx_model(nnx, case)
        nnx.update(flax_model, nnx.state(bnjax_model))
        expected = _nnx_results(flax_model, case, x, mask)
    _assert_close(_nnx_results(bnjax_model, case, x, mask), expected, case.tol)


def test_nnx_track_counters_only_adds_count_and_skipped():
    case = CASES["bn-default"]
    plain = _nnx_variables(_nnx_model(bnx, case))
    assert plain == _nnx_variables(_nnx_model(nnx, case))
    counted_model = _nnx_model(bnx, case, track_counters=True)
    counted = _nnx_variables(counted_model)
    extra = {path: v for path, v in counted.items() if path not in plain}
    assert extra == {
        ("count",): (nnx.BatchStat, (), jnp.int32),
        ("skipped",): (nnx.BatchStat, (), jnp.int32),
    }
    assert {path: v for path, v in counted.items() if path in plain} == plain
    _, _, stats = nnx.split(counted_model, nnx.Param, nnx.BatchStat)
    assert sorted(nnx.to_pure_dict(stats)) == ["count", "mean", "skipped", "var"]


class _NnxNet(nnx.Module):
    """nnx.Linear then a BatchNorm, as a flax.nnx model is written."""

    def __init__(self, namespace, rngs: nnx.Rngs):
        self.linear = nnx.Linear(SHAPE[-1], SHAPE[-1], rngs=rngs)
        self.norm = namespace.BatchNorm(SHAPE[-1], use_fast_variance=False, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def _nnx_net_train_step(model: nnx.Module, x):
    """A functional step the flax way: split, merge in the loss, return grads and new stats."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    weights = _loss_weights(x.shape)

    def loss(params, batch_stats):
        merged = nnx.merge(graphdef, params, batch_stats, copy=True)
        y = merged(x)
        return _scalar_loss(y, weights), (y, nnx.state(merged, nnx.BatchStat))

    (_, (y, new_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats)
    return y, nnx.to_pure_dict(new_stats), nnx.to_pure_dict(grads)


def test_nnx_split_merge_and_eval_work_like_flax():
    x = _input(Case("BatchNorm"))
    flax_net, bnjax_net = _NnxNet(nnx, nnx.Rngs(0)), _NnxNet(bnx, nnx.Rngs(0))
    # Same rng use as flax: the layers around initialise identically.
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(bnjax_net)), nnx.to_pure_dict(nnx.state(flax_net))
    )
    graphdef, params, batch_stats = nnx.split(bnjax_net, nnx.Param, nnx.BatchStat)
    round_trip = nnx.merge(graphdef, params, batch_stats)
    chex.assert_trees_all_equal(nnx.state(round_trip), nnx.state(bnjax_net))

    _assert_close(_nnx_net_train_step(bnjax_net, x), _nnx_net_train_step(flax_net, x), F32_TOL)
    # Stateful training calls, then model.eval(): running averages, statistics left alone.
    for net in (flax_net, bnjax_net):
        net(x)
        net(x * 0.5 + 1.0)
        net.eval()
    stats = nnx.to_pure_dict(nnx.state(bnjax_net, nnx.BatchStat))
    _assert_close(stats, nnx.to_pure_dict(nnx.state(flax_net, nnx.BatchStat)), F32_TOL)
    y = bnjax_net(x)
    _assert_close(y, flax_net(x), F32_TOL)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(bnjax_net, nnx.BatchStat)), stats)
    running = bnl.BatchNorm(use_running_average=True).apply(
        {
            "params": nnx.to_pure_dict(nnx.state(bnjax_net.norm, nnx.Param)),
            "batch_stats": stats["norm"],
        },
        bnjax_net.linear(x),
    )
    _assert_close(y, running, F32_TOL)


IDENTITY_PROMOTE_CASES = {
    name: CASES[name]
    for name in (
        "bn-default",
        "bn-bfloat16",
        "bn-x-bfloat16",
        "bn-mask-per-example",
        "ln-default",
        "ln-bfloat16",
        "rms-mask-feature",
        "gn-2-groups",
        "in-default",
    )
}


@pytest.mark.parametrize("case", _params(IDENTITY_PROMOTE_CASES))
def test_nnx_identity_promote_dtype_is_bitwise_linen(case):
    x, mask = _input(case), _mask(case)
    model = _nnx_model(bnx, case, promote_dtype=lambda args, **kw: args)
    nnx.update(model, _randomized_params(nnx.state(model, nnx.Param)))
    state = nnx.to_pure_dict(nnx.state(model))
    variables = {"params": {k: state[k] for k in ("scale", "bias") if k in state}}
    if case.module in HAS_RUNNING_STATS:
        variables["batch_stats"] = {"mean": state["mean"], "var": state["var"]}
    linen = _linen_module(bnl, case, training=True)
    y, stats = _linen_run(linen, variables, x, mask, {}, training=True)
    np.testing.assert_array_equal(model(x, mask=mask), y)
    if stats:
        chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), stats)
        model.eval()
        evaluation = _linen_module(bnl, case, training=False)
        np.testing.assert_array_equal(
            model(x, mask=mask), evaluation.apply({**variables, "batch_stats": stats}, x)
        )


# --- axis_name under jax.vmap -----------------------------------------------------------------


def _vmapped(module, variables, shards, in_axes, out_axes, training: bool):
    """module.apply on each shard with the mapped axis named 'i' (variables: in_axes[0])."""

    def apply(variables, shard):
        return _linen_run(module, variables, shard, None, {}, training)

    return jax.vmap(apply, in_axes=in_axes, out_axes=out_axes, axis_name="i")(variables, shards)


def test_linen_batch_norm_axis_name_matches_flax():
    """Two equal shards of the batch, no mask: flax's averaged means are exact there."""
    x = _input(Case("BatchNorm"))
    shards = x.reshape(2, 2, *x.shape[1:])
    variables = _randomized_variables(nn.BatchNorm(use_running_average=False), x)
    weights = _loss_weights(shards.shape)

    def sharded(namespace):
        module = namespace.BatchNorm(use_running_average=False, axis_name="i", **EXACT_FLAX)

        def loss(params, shards):
            sharded_vars = {**variables, "params": params}
            y, stats = _vmapped(module, sharded_vars, shards, (None, 0), 0, training=True)
            return _scalar_loss(y, weights), (y, stats)

        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, (y, stats)), grads = grad(variables["params"], shards)
        return y, stats, grads

    expected = sharded(nn)
    _assert_close(sharded(bnl), expected, F32_TOL)
    # Both are the unsplit batch's normalization (every shard stores the same statistics).
    full = nn.BatchNorm(use_running_average=False, **EXACT_FLAX)
    y_full, stats_full = _linen_run(full, variables, x, None, {}, training=True)
    y, stats = expected[0].reshape(x.shape), jax.tree.map(lambda a: a[1], expected[1])
    _assert_close((y, stats), (y_full, stats_full), F32_TOL)


def _split(a: jax.Array, axis: int) -> jax.Array:
    """Axis `axis` of size S becomes (2, S // 2): the mapped axis, then each shard's part."""
    return a.reshape(a.shape[:axis] + (2, a.shape[axis] // 2) + a.shape[axis + 1 :])


def _unsplit(a: jax.Array, axis: int) -> jax.Array:
    return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2 :])


SPLIT_REDUCTION_CASES = {
    # (case, the axis of x split across the mapped axis: always one the statistics reduce)
    "ln-split-c": (Case("LayerNorm"), 3),  # the feature axis: scale and bias split too
    "rms-split-c": (Case("RMSNorm"), 3),
    "gn-split-w": (Case("GroupNorm", {"num_groups": 2}), 2),
}


@pytest.mark.parametrize(
    ("case", "axis"),
    [pytest.param(*v, id=k) for k, v in SPLIT_REDUCTION_CASES.items()],
)
def test_linen_split_reduction_with_axis_name_equals_flax_unsplit(case, axis):
    x = _input(case)
    flax_module = _linen_module(nn, case, training=True)
    variables = _randomized_variables(flax_module, x)
    expected = _linen_step(flax_module, variables, x, None, {}, training=True)
    module = _linen_module(bnl, case, training=True, axis_name="i")
    split_params = axis in _feature_axes(case, x.ndim)
    params = jax.tree.map(lambda p: _split(p, 0), variables["params"])
    params = params if split_params else variables["params"]
    weights = _loss_weights(x.shape)

    def loss(params, x):
        in_axes = (0 if split_params else None, axis)
        y, _ = _vmapped(module, {"params": params}, _split(x, axis), in_axes, axis, False)
        y = _unsplit(y, axis)
        return _scalar_loss(y, weights), y

    (_, y), (param_grads, x_grad) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, x
    )
    if split_params:
        param_grads = jax.tree.map(lambda g: _unsplit(g, 0), param_grads)
    _assert_close((y, {}, (param_grads, x_grad)), expected, case.tol)


def _nnx_vmapped(model: nnx.Module, shards, axis: int):
    """The model on each shard (shared state), mapped axis 'i': outputs and new BatchStats."""
    graphdef, state = nnx.split(model)

    def call(state, shard):
        merged = nnx.merge(graphdef, state)
        return merged(shard), nnx.to_pure_dict(nnx.state(merged, nnx.BatchStat))

    mapped = jax.vmap(call, in_axes=(None, axis), out_axes=(axis, 0), axis_name="i")
    return mapped(state, shards)


def test_nnx_axis_name_matches_flax():
    """BatchNorm over two batch shards equals flax.nnx's with the same axis_name; LayerNorm
    with its reduction split over W equals flax.nnx on the unsplit input."""
    x = _input(Case("BatchNorm"))
    options = {"use_fast_variance": False, "rngs": nnx.Rngs(0)}
    flax_bn = nnx.BatchNorm(SHAPE[-1], axis_name="i", **options)
    bnjax_bn = bnx.BatchNorm(SHAPE[-1], axis_name="i", **options)
    nnx.update(flax_bn, _randomized_params(nnx.state(flax_bn, nnx.Param)))
    nnx.update(bnjax_bn, nnx.state(flax_bn))
    shards = _split(x, 0)
    _assert_close(_nnx_vmapped(bnjax_bn, shards, 0), _nnx_vmapped(flax_bn, shards, 0), F32_TOL)

    reduce_all = {"reduction_axes": (1, 2, 3), **options}
    flax_ln = nnx.LayerNorm(SHAPE[-1], **reduce_all)
    bnjax_ln = bnx.LayerNorm(SHAPE[-1], axis_name="i", **reduce_all)
    nnx.update(flax_ln, _randomized_params(nnx.state(flax_ln, nnx.Param)))
    nnx.update(bnjax_ln, nnx.state(flax_ln))
    y, _ = _nnx_vmapped(bnjax_ln, _split(x, 2), 2)
    _assert_close(_unsplit(y, 2), flax_ln(x), F32_TOL)


# --- a flax.linen training loop -----------------------------------------------------------------


class _LinenNet(nn.Module):
    """A flax model written against a namespace of norm modules (flax.linen or bnjax.linen)."""

    norm: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(SHAPE[-1])(x)
        x = self.norm.BatchNorm(use_running_average=not train, use_fast_variance=False)(x)
        return nn.Dense(1)(nn.relu(x).mean(axis=(1, 2)))


class _TrainState(train_state.TrainState):
    batch_stats: Any


def _train_step(state: _TrainState, x, targets):
    """flax's documented BatchNorm step: mutable batch_stats replace the old ones."""

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        y, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return jnp.mean((y - targets) ** 2), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    return state.replace(batch_stats=updates["batch_stats"]), loss


def _train(namespace, x, targets, steps: int = 3):
    """(initial variables, final (params, batch_stats), losses, evaluation output, number of
    params) of a short training run."""
    net = _LinenNet(namespace)
    variables = net.init(KEY, x, train=False)
    state = _TrainState.create(
        apply_fn=net.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(0.1),
    )
    losses = []
    for _ in range(steps):
        state, loss = _train_step(state, x, targets)
        losses.append(loss)
    evaluation = net.apply({"params": state.params, "batch_stats": state.batch_stats}, x, False)
    n_params = sum(a.size for a in jax.tree.leaves(variables["params"]))
    return variables, (state.params, state.batch_stats), losses, evaluation, n_params


def test_linen_train_state_step_is_the_same_code_for_flax_and_bnjax():
    x = _input(Case("BatchNorm"))
    targets = _normal((SHAPE[0], 1), 4)
    (flax_init, flax_vars, flax_losses, flax_eval, flax_count) = _train(nn, x, targets)
    (bnjax_init, bnjax_vars, bnjax_losses, bnjax_eval, bnjax_count) = _train(bnl, x, targets)
    chex.assert_trees_all_equal(bnjax_init, flax_init)  # flax's initial values, same rng use
    assert bnjax_count == flax_count
    _assert_close((bnjax_vars, bnjax_losses, bnjax_eval), (flax_vars, flax_losses, flax_eval), 1e-4)
    assert flax_losses[-1] < flax_losses[0]  # the loop does train
