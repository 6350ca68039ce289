"""bnjax.linen: each module equals its core function and is a drop-in for flax.linen's.

The tests share one input shape (SHAPE, 32 channels for GroupNorm's default 32 groups), so
eagerly run operations compile once for the whole file.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import bnjax
from bnjax import linen as bnn

KEY = jax.random.key(0)
SHAPE = (4, 2, 2, 32)
C = SHAPE[-1]
NAMES = ["BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm", "RMSNorm"]
SCOPE = ("parent", "name")  # fields every linen module has
TRAIN = ["batch_stats"]  # the one mutable collection of a training step, as in flax
COUNTED = {"track_counters": True}


def _random(shape=SHAPE, key=1, loc=2.0, scale=3.0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(key), shape) * scale + loc).astype(dtype)


def _affine(key=2):
    return {"scale": _random((C,), key, 1.0, 1.0), "bias": _random((C,), key + 1, 0.0, 1.0)}


def _variables(module, x):
    """Variables of `module` with random scale and bias."""
    return {**module.init(KEY, x), "params": _affine()}


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def _flax_and_ours(name, **options):
    """flax's module (with its two-pass variance, for a tight comparison) and ours."""
    return getattr(nn, name)(use_fast_variance=False, **options), getattr(bnn, name)(**options)


# --- each module is its core function ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"axis": 1},
        {"momentum": None},
        {"use_unbiased_running_var": True},
        {"ghost_batch_size": 2},
        {"mask": True},
    ],
    ids=["default", "nchw", "cumulative", "unbiased", "ghost", "mask"],
)
def test_batch_norm_equals_core(options):
    options = dict(options)
    # A per-example mask, written as flax does: broadcastable to x.
    mask = _random((SHAPE[0], 1, 1, 1), 5) > 2.0 if options.pop("mask", False) else None
    x = _random()
    if options.get("axis") == 1:
        x = jnp.moveaxis(x, -1, 1)
    module = bnn.BatchNorm(use_running_average=False, **options, **COUNTED)
    variables = _variables(module, x)
    state = bnjax.batch_norm_state(C)._replace(mean=_random((C,), 7), var=_random((C,), 8) ** 2)
    variables["batch_stats"] = {"mean": state.mean, "var": state.var}
    params = variables["params"]
    for _ in range(2):
        y, updates = module.apply(variables, x, mask=mask, mutable=TRAIN)
        expected_y, state = bnjax.batch_norm(
            x, state, params["scale"], params["bias"], training=True, mask=mask, **options
        )
        variables = {**variables, **updates}
        _close(y, expected_y, 1e-6)
        stats = {k: getattr(state, k) for k in ("mean", "var", "count", "skipped")}
        _close(updates["batch_stats"], stats, 1e-6)
    y = bnn.BatchNorm(use_running_average=True, **options).apply(variables, x)
    _close(y, bnjax.batch_norm(x, state, **params, training=False, **options)[0], 1e-6)


@pytest.mark.parametrize("bounds", [{"r_max": 1.5, "d_max": 0.5}, {}], ids=["fixed", "schedule"])
def test_batch_renorm_equals_core(bounds):
    schedule = None if bounds else bnjax.RenormSchedule(1, 2.0, 2, 1.0, 2)
    module = bnn.BatchRenorm(use_running_average=False, schedule=schedule, **bounds, **COUNTED)
    variables = _variables(module, _random())
    state, params = bnjax.batch_renorm_state(C), variables["params"]
    for step in range(3):
        x = _random(key=10 + step)
        y, updates = module.apply(variables, x, mutable=TRAIN)
        expected_y, state = bnjax.batch_renorm(
            x, state, params["scale"], params["bias"], training=True, schedule=schedule, **bounds
        )
        variables = {**variables, **updates}
        _close(y, expected_y, 1e-6)
        names = ("mean", "var", "renorm_mean", "renorm_var", "step", "count", "skipped")
        _close(updates["batch_stats"], {k: getattr(state, k) for k in names}, 1e-6)
    y = bnn.BatchRenorm(use_running_average=True, schedule=schedule, **bounds).apply(variables, x)
    _close(y, bnjax.batch_renorm(x, state, **params, training=False, **bounds)[0], 1e-6)


@pytest.mark.parametrize(
    "module, function",
    [
        (bnn.GroupNorm(num_groups=4), lambda x, **p: bnjax.group_norm(x, **p, num_groups=4)),
        (bnn.LayerNorm(), lambda x, **p: bnjax.layer_norm(x, **p)),
        (bnn.InstanceNorm(), lambda x, **p: bnjax.instance_norm(x, **p)),
        (bnn.RMSNorm(), lambda x, **p: bnjax.rms_norm(x, **p)),
    ],
    ids=["group", "layer", "instance", "rms"],
)
def test_stateless_modules_equal_core(module, function):
    x = _random()
    variables = module.init(KEY, x)
    variables["params"] = {k: v for k, v in _affine().items() if k in variables["params"]}
    _close(module.apply(variables, x), function(x, **variables["params"]), 1e-6)


# --- drop-in for flax ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NAMES, "BatchRenorm"])
def test_fields_are_flax_fields_with_flax_defaults(name):
    def fields(cls):
        return [(f.name, f.default) for f in dataclasses.fields(cls) if f.name not in SCOPE]

    # flax has no BatchRenorm: it takes BatchNorm's fields and appends its own.
    ours, theirs = fields(getattr(bnn, name)), fields(getattr(nn, name, nn.BatchNorm))
    assert ours[: len(theirs)] == theirs


@pytest.mark.parametrize("name", NAMES)
def test_default_module_matches_flax(name):
    """Same variable names, outputs and (after training steps and in eval) batch_stats."""
    x = _random()
    train = {"use_running_average": False} if name == "BatchNorm" else {}
    theirs, ours = _flax_and_ours(name, **train)
    flax_vars, our_vars = theirs.init(KEY, x), ours.init(KEY, x)
    # Exactly flax's variables: collections, names, shapes and dtypes.
    assert jax.tree.map(lambda v: (v.shape, v.dtype), our_vars) == jax.tree.map(
        lambda v: (v.shape, v.dtype), flax_vars
    )
    affine = {k: v for k, v in _affine().items() if k in flax_vars["params"]}
    flax_vars["params"] = our_vars["params"] = affine
    for step in range(2):
        batch = _random(key=20 + step)
        y_flax, flax_updates = theirs.apply(flax_vars, batch, mutable=["batch_stats"])
        y_ours, our_updates = ours.apply(our_vars, batch, mutable=["batch_stats"])
        _close(y_ours, y_flax)
        _close(our_updates, flax_updates)
        flax_vars, our_vars = {**flax_vars, **flax_updates}, {**our_vars, **our_updates}
    if name == "BatchNorm":
        evaluate = {"use_running_average": True}
        _close(
            bnn.BatchNorm(**evaluate).apply(our_vars, x),
            nn.BatchNorm(**evaluate).apply(flax_vars, x),
        )


class _Net(nn.Module):
    """A flax model written against a namespace of norm modules: the swap is one name."""

    norm: object

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(C)(x)
        x = self.norm.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(self.norm.GroupNorm()(nn.relu(x))).mean(axis=(1, 2))
        x = self.norm.LayerNorm()(nn.Dense(C)(x))
        return nn.Dense(2)(x)


def test_swapping_the_module_keeps_the_model_and_its_checkpoints():
    x = _random()
    flax_net, our_net = _Net(nn), _Net(bnn)
    flax_vars = flax_net.init(KEY, x, train=False)
    our_vars = our_net.init(KEY, x, train=False)
    collections = ("params", "batch_stats")
    _close({k: our_vars[k] for k in collections}, {k: flax_vars[k] for k in collections}, 0)
    # A flax checkpoint (params + batch_stats only) drives the bnjax model, and vice versa.
    for source in (flax_vars, our_vars):
        y_flax, flax_updates = flax_net.apply(source, x, train=True, mutable=["batch_stats"])
        y_ours, our_updates = our_net.apply(source, x, train=True, mutable=["batch_stats"])
        _close(y_ours, y_flax, 1e-4)
        _close(our_updates, flax_updates, 1e-4)
        _close(our_net.apply(source, x, train=False), flax_net.apply(source, x, train=False))


def test_counters_are_opt_in_and_live_in_batch_stats():
    x = _random()
    assert set(bnn.BatchNorm(use_running_average=False).init(KEY, x)) == {"params", "batch_stats"}
    bn = bnn.BatchNorm(use_running_average=False, **COUNTED)
    variables = bn.init(KEY, x)
    assert set(variables) == {"params", "batch_stats"}
    assert {k: int(variables["batch_stats"][k]) for k in ("count", "skipped")} == {
        "count": 0,
        "skipped": 0,
    }
    _, updates = bn.apply(variables, x, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["count"]) == 1
    with pytest.raises(ValueError, match="track_counters=True"):
        bnn.BatchNorm(use_running_average=False, momentum=None).init(KEY, x)


def test_renorm_step_lives_in_batch_stats_so_the_schedule_advances():
    x = _random()
    layer = bnn.BatchRenorm(use_running_average=False)
    variables = layer.init(KEY, x)
    for _ in range(2):
        _, updates = layer.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
    assert int(variables["batch_stats"]["step"]) == 2


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
def test_non_finite_batch_leaves_batch_stats_untouched(name):
    x = _random().at[2, 0, 1, 1].set(jnp.nan)
    layer = getattr(bnn, name)(use_running_average=False, **COUNTED)
    variables = layer.init(KEY, x)
    y, updates = layer.apply(variables, x, mutable=TRAIN)
    _close(updates["batch_stats"], {**variables["batch_stats"], "skipped": 1}, 0)
    assert bool(jnp.isfinite(y[..., 0]).all())
    # Guarded without counters too (the default).
    layer = getattr(bnn, name)(use_running_average=False)
    variables = layer.init(KEY, x)
    _, updates = layer.apply(variables, x, mutable=["batch_stats"])
    _close(updates["batch_stats"], variables["batch_stats"], 0)


def test_init_needs_neither_a_bound_axis_name_nor_a_real_batch():
    x = jnp.ones((1, C))
    variables = bnn.BatchNorm(use_running_average=False, axis_name="batch").init(KEY, x)
    assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {"mean": (C,), "var": (C,)}
    with pytest.raises(ValueError, match="single value"):
        bnn.BatchNorm(use_running_average=False).apply(variables, x)


@pytest.mark.parametrize(
    "x_dtype, dtype",
    [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
    ids=["bf16-promoted", "f32-to-bf16", "bf16-to-f32"],
)
@pytest.mark.parametrize("name", NAMES)
def test_dtype_follows_flax(name, x_dtype, dtype):
    x = _random(dtype=x_dtype)
    options = {"dtype": dtype} | ({"use_running_average": False} if name == "BatchNorm" else {})
    theirs, ours = _flax_and_ours(name, **options)
    y_flax, _ = theirs.init_with_output(KEY, x)
    y_ours, variables = ours.init_with_output(KEY, x)
    assert y_ours.dtype == y_flax.dtype
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    _close(y_ours.astype(jnp.float32), y_flax.astype(jnp.float32), 2e-2)


def test_group_norm_reduction_axes_follow_flax_or_raise():
    x = _random()
    flax_gn = nn.GroupNorm(num_groups=4, reduction_axes=(2, 3), use_fast_variance=False)
    our_gn = bnn.GroupNorm(num_groups=4, reduction_axes=(2, 3))
    variables = our_gn.init(KEY, x)
    _close(our_gn.apply(variables, x), flax_gn.apply(variables, x))
    with pytest.raises(ValueError, match="must include the channel axis"):
        bnn.GroupNorm(num_groups=4, reduction_axes=(1, 2)).init(KEY, x)


# --- checkpoints and devices ---------------------------------------------------------------------


def _trained_variables():
    x = _random()
    bn = bnn.BatchNorm(use_running_average=False)
    _, updates = bn.apply(bn.init(KEY, x), x, mutable=TRAIN)
    return {**bn.init(KEY, x), **updates}


def test_variables_round_trip_through_flax_serialization():
    variables = _trained_variables()
    target = bnn.BatchNorm(use_running_average=True).init(KEY, _random())
    restored = serialization.from_bytes(target, serialization.to_bytes(variables))
    chex.assert_trees_all_equal(restored, variables)


def test_variables_round_trip_through_orbax(tmp_path):
    variables = _trained_variables()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "bn", variables)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, variables)
    restored = checkpointer.restore(tmp_path / "bn", abstract)
    chex.assert_trees_all_equal(restored, variables)
    chex.assert_trees_all_equal_dtypes(restored, variables)


def test_pmap_with_axis_name_equals_one_device():
    devices, x = 8, _random((8 * 3, 2, C))
    bn = bnn.BatchNorm(use_running_average=False, axis_name="batch")
    variables = _variables(bn, x)

    def train(variables, x):
        return bn.apply(variables, x, mutable=TRAIN)

    single = bnn.BatchNorm(use_running_average=False)
    y, updates = single.apply(variables, x, mutable=TRAIN)
    y_p, updates_p = jax.pmap(train, axis_name="batch", in_axes=(None, 0))(
        variables, x.reshape(devices, 3, 2, C)
    )
    _close(y_p.reshape(x.shape), y)
    for device in range(devices):
        _close(jax.tree.map(lambda a, d=device: a[d], updates_p), updates, 1e-6)


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("flag", ["False", 0, 1.0], ids=["string", "int", "float"])
def test_use_running_average_must_be_a_bool(name, flag):
    """'False' is a truthy string: it used to select evaluation without a word."""
    x = _random()
    variables = getattr(bnn, name)(use_running_average=True).init(KEY, x)
    with pytest.raises(TypeError, match=r"`use_running_average` must be True or False, got"):
        getattr(bnn, name)(use_running_average=flag).apply(variables, x, mutable=TRAIN)
    with pytest.raises(TypeError, match="`use_running_average` must be True or False"):
        getattr(bnn, name)().apply(variables, x, use_running_average=flag, mutable=TRAIN)


def test_use_running_average_takes_concrete_bool_scalars():
    x = _random()
    bn = bnn.BatchNorm(**COUNTED)
    variables = bn.init(KEY, x, use_running_average=True)
    for flag in (np.bool_(False), jnp.array(False)):
        _, updates = bn.apply(variables, x, use_running_average=flag, mutable=TRAIN)
        assert int(updates["batch_stats"]["count"]) == 1
    traced = jax.jit(lambda flag: bn.apply(variables, x, use_running_average=flag))
    with pytest.raises(TypeError, match="`use_running_average` must be True or False, known"):
        traced(True)
