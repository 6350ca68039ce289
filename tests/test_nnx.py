"""bnjax.nnx: each module equals its core function and is a drop-in for flax.nnx's.

One input shape for the whole file (as in test_linen.py), so eager operations compile once.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

import bnjax
from bnjax import nnx as bnx

SHAPE = (4, 2, 2, 32)
C = SHAPE[-1]
NAMES = ["BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm", "RMSNorm"]
COUNTED = {"track_counters": True}


def _random(shape=SHAPE, key=1, loc=2.0, scale=3.0):
    return jax.random.normal(jax.random.key(key), shape) * scale + loc


def _randomize_affine(module, key=2):
    module.scale[...] = _random((C,), key, 1.0, 1.0)
    if getattr(module, "bias", None) is None:  # RMSNorm has none
        return {"scale": module.scale[...]}
    module.bias[...] = _random((C,), key + 1, 0.0, 1.0)
    return {"scale": module.scale[...], "bias": module.bias[...]}


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def _values(module, kind):
    return jax.tree.map(lambda v: v[...], nnx.to_pure_dict(nnx.state(module, kind)))


# --- each module is its core function ----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"axis": 1}, {"momentum": None}, {"ghost_batch_size": 2}, {"mask": True}],
    ids=["default", "nchw", "cumulative", "ghost", "mask"],
)
def test_batch_norm_equals_core(options):
    options = dict(options)
    # A per-example mask, written as flax does: broadcastable to x.
    mask = _random((SHAPE[0], 1, 1, 1), 5) > 2.0 if options.pop("mask", False) else None
    x = jnp.moveaxis(_random(), -1, 1) if options.get("axis") == 1 else _random()
    bn = bnx.BatchNorm(C, rngs=nnx.Rngs(0), **options, **COUNTED)
    params, state = _randomize_affine(bn), bnjax.batch_norm_state(C)
    for _ in range(2):
        y = bn(x, mask=mask)
        expected_y, state = bnjax.batch_norm(
            x, state, **params, training=True, mask=mask, **options
        )
        _close(y, expected_y, 1e-6)
        _close((bn.mean[...], bn.var[...]), (state.mean, state.var), 1e-6)
        assert (int(bn.count[...]), int(bn.skipped[...])) == (state.count, state.skipped)
    bn.eval()
    _close(bn(x), bnjax.batch_norm(x, state, **params, training=False, **options)[0], 1e-6)
    assert int(bn.count[...]) == 2  # evaluation leaves the state alone


def test_batch_renorm_equals_core():
    schedule = bnjax.RenormSchedule(1, 2.0, 2, 1.0, 2)
    layer = bnx.BatchRenorm(C, schedule=schedule, rngs=nnx.Rngs(0), **COUNTED)
    params, state = _randomize_affine(layer), bnjax.batch_renorm_state(C)
    for step in range(3):
        x = _random(key=10 + step)
        y = layer(x)
        expected_y, state = bnjax.batch_renorm(x, state, **params, training=True, schedule=schedule)
        _close(y, expected_y, 1e-6)
        for name in ("mean", "var", "renorm_mean", "renorm_var", "step", "count", "skipped"):
            _close(getattr(layer, name)[...], getattr(state, name), 1e-6)
    layer.eval()
    _close(layer(x), bnjax.batch_renorm(x, state, **params, training=False)[0], 1e-6)


@pytest.mark.parametrize(
    "module, function",
    [
        (bnx.GroupNorm, lambda x, **p: bnjax.group_norm(x, **p, num_groups=32)),
        (bnx.LayerNorm, lambda x, **p: bnjax.layer_norm(x, **p)),
        (bnx.InstanceNorm, lambda x, **p: bnjax.instance_norm(x, **p)),
        (bnx.RMSNorm, lambda x, **p: bnjax.rms_norm(x, **p)),
    ],
    ids=["group", "layer", "instance", "rms"],
)
def test_stateless_modules_equal_core(module, function):
    layer = module(C, rngs=nnx.Rngs(0))
    params = _randomize_affine(layer)
    _close(layer(_random()), function(_random(), **params), 1e-6)


# --- drop-in for flax ----------------------------------------------------------------------------

NOT_ATTRIBUTES = {
    "self",
    "num_features",
    "rngs",
    "bias_metadata",
    "scale_metadata",
    "bias_init",
    "scale_init",
}


@pytest.mark.parametrize("name", NAMES)
def test_constructor_arguments_are_flax_arguments_with_flax_defaults(name):
    flax_cls, our_cls = getattr(nnx, name), getattr(bnx, name)
    theirs, ours = flax_cls(C, rngs=nnx.Rngs(0)), our_cls(C, rngs=nnx.Rngs(0))
    for argument in inspect.signature(flax_cls.__init__).parameters:
        if argument not in NOT_ATTRIBUTES:
            assert getattr(ours, argument) == getattr(theirs, argument), argument
    positional = [p for p in inspect.signature(flax_cls).parameters.values() if p.kind == 1]
    ours_positional = [p for p in inspect.signature(our_cls).parameters.values() if p.kind == 1]
    assert [(p.name, p.default) for p in ours_positional] == [
        (p.name, p.default) for p in positional
    ]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_is_flax_signature(name):
    """Every flax argument, with flax's kind and default (initializers and metadata included);
    bnjax's own options are keyword-only. The constructor is generated from the declared
    options (a dataclass), so this checks that each is declared as flax spells it."""
    flax_init = inspect.signature(getattr(nnx, name).__init__).parameters
    ours = inspect.signature(getattr(bnx, name).__init__).parameters
    for argument, theirs in flax_init.items():
        assert argument in ours, argument
        assert ours[argument].kind == theirs.kind, argument
        assert ours[argument].default == theirs.default, argument
    for argument in set(ours) - set(flax_init):
        assert ours[argument].kind == inspect.Parameter.KEYWORD_ONLY, argument


def test_batch_renorm_takes_every_batch_norm_option():
    batch_norm = inspect.signature(bnx.BatchNorm.__init__).parameters
    renorm = inspect.signature(bnx.BatchRenorm.__init__).parameters
    assert {n: p.default for n, p in batch_norm.items()}.items() <= {
        n: p.default for n, p in renorm.items()
    }.items()


@pytest.mark.parametrize("name", NAMES)
def test_default_module_matches_flax(name):
    """Same Param and BatchStat variables; same outputs and statistics, train and eval."""
    theirs = getattr(nnx, name)(C, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = getattr(bnx, name)(C, rngs=nnx.Rngs(0))
    for kind in (nnx.Param, nnx.BatchStat):
        _close(_values(ours, kind), _values(theirs, kind), 0)
    _randomize_affine(ours)
    _randomize_affine(theirs)
    for step in range(2):
        x = _random(key=20 + step)
        _close(ours(x), theirs(x))
        _close(_values(ours, nnx.BatchStat), _values(theirs, nnx.BatchStat))
    ours.eval()
    theirs.eval()
    _close(ours(x), theirs(x))


@pytest.mark.parametrize(
    "x_dtype, dtype",
    [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)],
    ids=["bf16-promoted", "f32-to-bf16", "bf16-to-f32"],
)
@pytest.mark.parametrize("name", ["BatchNorm", "GroupNorm"])
def test_dtype_follows_flax(name, x_dtype, dtype):
    x = _random().astype(x_dtype)
    y_flax = getattr(nnx, name)(C, dtype=dtype, rngs=nnx.Rngs(0))(x)
    y_ours = getattr(bnx, name)(C, dtype=dtype, rngs=nnx.Rngs(0))(x)
    assert y_ours.dtype == y_flax.dtype
    _close(y_ours.astype(jnp.float32), y_flax.astype(jnp.float32), 2e-2)


class _Net(nnx.Module):
    def __init__(self, norm, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, C, rngs=rngs)
        self.norm = norm.BatchNorm(C, rngs=rngs)
        self.out = nnx.Linear(C, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.linear(x))))


def _inputs():
    return _random((SHAPE[0], 3)), _random((SHAPE[0], 2), key=3, loc=0.0, scale=1.0)


def test_swapped_model_initialises_and_toggles_like_flax():
    """One rngs key per scale/bias as flax, so the layers around get the same init."""
    theirs, ours = _Net(nnx, nnx.Rngs(0)), _Net(bnx, nnx.Rngs(0))
    _close(_values(ours, nnx.Param), _values(theirs, nnx.Param), 0)
    x, _ = _inputs()
    for mode in ("train", "eval", "train"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        assert ours.norm.use_running_average == theirs.norm.use_running_average
        _close(ours(x), theirs(x))
        _close(_values(ours, nnx.BatchStat), _values(theirs, nnx.BatchStat))
    assert nnx.view(ours, use_running_average=True).norm.use_running_average
    assert not ours.norm.use_running_average
    before = _values(ours, nnx.BatchStat)
    ours.norm(ours.linear(x), use_running_average=True)  # the call argument wins
    _close(_values(ours, nnx.BatchStat), before, 0)


def test_training_step_under_nnx_jit_equals_eager():
    x, target = _inputs()

    def step(model, optimizer):
        def loss(model):
            return jnp.mean((model(x) - target) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    models = [_Net(bnx, nnx.Rngs(0)) for _ in range(2)]
    optimizers = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]
    jitted = nnx.jit(step)
    for _ in range(2):
        _close(jitted(models[0], optimizers[0]), step(models[1], optimizers[1]))
    _close(nnx.to_pure_dict(nnx.state(models[0])), nnx.to_pure_dict(nnx.state(models[1])))
    for model in models:
        model.eval()
    _close(nnx.jit(lambda m: m(x))(models[0]), models[1](x))


def test_counters_are_opt_in_batch_stats_so_the_standard_split_works():
    bn = bnx.BatchNorm(C, rngs=nnx.Rngs(0))
    assert set(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))) == {"mean", "var"}
    counted = bnx.BatchNorm(C, rngs=nnx.Rngs(0), **COUNTED)
    counted(_random())
    graphdef, params, batch_stats = nnx.split(counted, nnx.Param, nnx.BatchStat)
    assert set(nnx.to_pure_dict(batch_stats)) == {"mean", "var", "count", "skipped"}
    assert int(nnx.merge(graphdef, params, batch_stats).count[...]) == 1
    with pytest.raises(ValueError, match="track_counters=True"):
        bnx.BatchNorm(C, momentum=None, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
def test_non_finite_batch_leaves_the_statistics_untouched(name):
    layer = getattr(bnx, name)(C, rngs=nnx.Rngs(0), **COUNTED)
    before = _values(layer, nnx.BatchStat)
    y = layer(_random().at[2, 0, 1, 1].set(jnp.nan))
    _close(_values(layer, nnx.BatchStat), {**before, "skipped": 1}, 0)
    assert bool(jnp.isfinite(y[..., 0]).all())


def test_flax_state_restores_into_bnjax_model_and_back():
    x, _ = _inputs()
    theirs, ours = _Net(nnx, nnx.Rngs(0)), _Net(bnx, nnx.Rngs(1))
    theirs(x)  # one training step of statistics
    nnx.update(ours, nnx.state(theirs))
    ours.eval()
    theirs.eval()
    _close(ours(x), theirs(x), 0)
    back = _Net(nnx, nnx.Rngs(2))
    back.eval()
    nnx.update(back, nnx.state(ours))
    _close(back(x), ours(x), 0)


def _trained():
    model = _Net(bnx, nnx.Rngs(0))
    model(_inputs()[0])
    return model


def test_state_round_trips_through_flax_serialization():
    model, fresh = _trained(), _Net(bnx, nnx.Rngs(5))
    data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), data))
    nnx.update(fresh, state)
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(fresh)), nnx.to_pure_dict(nnx.state(model))
    )


def test_state_round_trips_through_orbax(tmp_path):
    model = _trained()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "net", nnx.state(model))
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: _Net(bnx, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "net", abstract_state))
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(restored)), nnx.to_pure_dict(nnx.state(model))
    )
    assert restored.norm.mean[...].dtype == jnp.float32


def test_bad_group_count_raises():
    with pytest.raises(ValueError, match="divide"):
        bnx.GroupNorm(C, num_groups=5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("flag", ["False", 0, 1.0], ids=["string", "int", "float"])
def test_use_running_average_must_be_a_bool(name, flag):
    """'False' is a truthy string: it used to select evaluation without a word."""
    x = jnp.arange(24.0).reshape(8, 3)
    layer = getattr(bnx, name)(3, use_running_average=flag, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"`use_running_average` must be True or False, got"):
        layer(x)
    layer = getattr(bnx, name)(3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"`use_running_average` must be True or False, got"):
        layer(x, use_running_average=flag)
    layer.set_view(use_running_average=flag)
    with pytest.raises(TypeError, match=r"`use_running_average` must be True or False, got"):
        layer(x)


def test_use_running_average_takes_concrete_bool_scalars():
    x = jnp.arange(24.0).reshape(8, 3)
    layer = bnx.BatchNorm(3, track_counters=True, rngs=nnx.Rngs(0))
    layer(x, use_running_average=np.bool_(False))
    layer(x, use_running_average=jnp.array(False))
    assert int(layer.count[...]) == 2
