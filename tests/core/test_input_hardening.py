"""Inputs that used to be accepted and wrong, rejected though valid, or crash obscurely.

Each bad input fails at trace time with a ValueError/TypeError naming the argument; each valid
spelling (NumPy integers, lists, Python-int counters, a traced epsilon) gives the same numbers
as the canonical one; running statistics that come in non-finite are never blamed on the batch.
"""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import models, parallel

X = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (8, 3)), jnp.float32)
X4 = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 3, 8)), jnp.float32)
STATE = bnjax.batch_norm_state(3)
RENORM_STATE = bnjax.batch_renorm_state(3)


def _bn(**kwargs):
    kwargs.setdefault("training", True)
    return bnjax.batch_norm(kwargs.pop("x", X), kwargs.pop("state", STATE), **kwargs)


def _renorm(**kwargs):
    kwargs.setdefault("training", True)
    return bnjax.batch_renorm(kwargs.pop("x", X), kwargs.pop("state", RENORM_STATE), **kwargs)


NORMALIZERS = {
    "batch_norm": _bn,
    "batch_renorm": _renorm,
    "group_norm": lambda **kw: bnjax.group_norm(X4, num_groups=2, **kw),
    "layer_norm": lambda **kw: bnjax.layer_norm(X, **kw),
    "instance_norm": lambda **kw: bnjax.instance_norm(X4, **kw),
}


# --------------------------------------------------------------------------------------------
# 1. Accepted and wrong: now refused.


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
@pytest.mark.parametrize(
    ("epsilon", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (0.0, ValueError),
        (np.float32(0.0), ValueError),
        (jnp.array(float("nan")), ValueError),
        (True, TypeError),
    ],
    ids=["nan", "inf", "zero", "np_zero", "jnp_nan", "bool"],
)
def test_epsilon_must_be_finite_and_positive(name, epsilon, error):
    with pytest.raises(error, match="`epsilon`"):
        NORMALIZERS[name](epsilon=epsilon)


@pytest.mark.parametrize("call", [_bn, _renorm], ids=["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("training", [None, "False", 1], ids=["none", "string", "int"])
def test_training_must_be_a_bool(call, training):
    with pytest.raises(TypeError, match="training must be True or False"):
        call(training=training)


@pytest.mark.parametrize("training", [np.bool_(True), jnp.array(True)], ids=["numpy", "jax"])
def test_training_accepts_concrete_bool_scalars(training):
    chex.assert_trees_all_close(_bn(training=training), _bn(training=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(ghost_batch_size=True), ValueError, "`ghost_batch_size` must be a positive int"),
        (dict(axis=True), TypeError, "`axis` must be an int"),
        (dict(axis=(True,)), TypeError, "`axis` must be an int"),
    ],
)
def test_bools_are_not_ints(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _bn(**kwargs)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("field", ["mean", "var"])
def test_statistics_must_be_float32_or_float64(field, dtype):
    state = STATE._replace(**{field: getattr(STATE, field).astype(dtype)})
    with pytest.raises(TypeError, match=rf"`state\.{field}` has dtype .*batch_norm_state"):
        _bn(state=state)


def test_renorm_statistics_must_be_float32_or_float64():
    state = RENORM_STATE._replace(renorm_var=RENORM_STATE.renorm_var.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match=r"`state\.renorm_var` has dtype .*batch_renorm_state"):
        _renorm(state=state)
    with pytest.raises(TypeError, match="`dtype`"):
        bnjax.batch_norm_state(3, jnp.bfloat16)


@pytest.mark.parametrize("call", [_bn, _renorm], ids=["batch_norm", "batch_renorm"])
def test_mask_must_be_boolean(call):
    with pytest.raises(TypeError, match=r"`mask` must be boolean.*mask > 0"):
        call(mask=jnp.full((8, 1), 0.5))


def test_integer_mask_means_nonzero_as_in_flax():
    keep = (np.arange(8) % 3 != 0)[:, None]
    chex.assert_trees_all_close(_bn(mask=keep.astype(np.int32)), _bn(mask=keep))


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda v: _bn(momentum=v(1.5)), "`momentum`"),
        (lambda v: _renorm(renorm_momentum=v(-0.5)), "`renorm_momentum`"),
        (lambda v: _renorm(r_max=v(0.5), d_max=1.0), "`r_max`"),
        (lambda v: _renorm(r_max=2.0, d_max=v(-1.0)), "`d_max`"),
        (lambda v: _renorm(r_max=v(float("nan")), d_max=1.0), "`r_max`"),
        (lambda v: _renorm(schedule=bnjax.RenormSchedule(r_max=v(0.9))), r"`schedule\.r_max`"),
    ],
)
@pytest.mark.parametrize(
    "spelling", [np.float32, np.float64, jnp.asarray], ids=["np32", "np64", "jnp"]
)
def test_concrete_scalars_are_bound_checked(call, pattern, spelling):
    with pytest.raises(ValueError, match=pattern):
        call(spelling)


def test_traced_bounds_stay_unchecked():
    # Values only known at run time cannot be checked at trace time; they must still trace.
    run = jax.jit(lambda m, r: _renorm(momentum=m, r_max=r, d_max=1.0)[1].count)
    assert int(run(0.9, 2.0)) == 1


# --------------------------------------------------------------------------------------------
# 2. Rejected though valid: now accepted, with the same numbers.


def test_numpy_integers_are_ints():
    chex.assert_trees_all_close(
        bnjax.group_norm(X4, num_groups=np.int64(2)), bnjax.group_norm(X4, num_groups=2)
    )
    chex.assert_trees_all_close(
        bnjax.group_norm(X4, num_groups=None, group_size=np.int32(4)),
        bnjax.group_norm(X4, num_groups=2),
    )
    chex.assert_trees_all_close(_bn(ghost_batch_size=np.int64(4)), _bn(ghost_batch_size=4))
    chex.assert_trees_all_close(_bn(axis=np.int64(-1)), _bn())
    assert bnjax.batch_norm_state(np.int64(3)).mean.shape == (3,)


@pytest.mark.parametrize(
    ("name", "ghost_batch_size"), [("batch_norm", None), ("batch_norm", 4), ("batch_renorm", None)]
)
def test_traced_epsilon_trains_like_a_concrete_one(name, ghost_batch_size):
    bias = jnp.array([0.0, 1.0, -1.0])
    call = NORMALIZERS[name]
    if name == "batch_renorm":
        call = functools.partial(call, r_max=1.5, d_max=0.5)

    def loss(x, scale, epsilon):
        y, state = call(
            x=x, scale=scale, bias=bias, epsilon=epsilon, ghost_batch_size=ghost_batch_size
        )
        return jnp.sum(jnp.sin(y)), (y, state)

    grads = jax.grad(loss, argnums=(0, 1), has_aux=True)
    scale = jnp.array([1.0, 2.0, 0.5])
    traced = jax.jit(grads)(X, scale, 0.5)  # epsilon is a jit argument: traced
    concrete = grads(X, scale, 0.5)
    chex.assert_trees_all_close(traced, concrete, rtol=1e-5, atol=1e-6)


def test_gradient_with_respect_to_a_traced_epsilon():
    def plain(epsilon):
        y = (X - X.mean(0)) / jnp.sqrt(X.var(0) + epsilon)
        return jnp.sum(jnp.sin(y))

    def ours(epsilon):
        return jnp.sum(jnp.sin(_bn(epsilon=epsilon)[0]))

    np.testing.assert_allclose(jax.grad(ours)(0.5), jax.grad(plain)(0.5), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. Obscure crashes: now a clear error, or the friendly reading.


def test_empty_batch_with_ghost_batches_is_an_empty_batch():
    empty = jnp.ones((0, 3))
    y, state = _bn(x=empty, ghost_batch_size=4)
    reference = _bn(x=empty)
    chex.assert_trees_all_close((y, state), reference)
    assert y.shape == (0, 3) and int(state.skipped) == 1 and int(state.count) == 0


def test_float_axis_is_named():
    with pytest.raises(TypeError, match="`axis` must be an int"):
        _bn(axis=1.0)


def test_group_norm_takes_one_channel_axis():
    with pytest.raises(TypeError, match=r"`axis` is the one channel axis.*layer_norm"):
        bnjax.group_norm(X4, axis=(1, 3), num_groups=2)


def test_instance_norm_takes_several_feature_axes_as_flax():
    """flax's InstanceNorm(feature_axes=(1, 3)): statistics over the remaining axis 2."""
    y = bnjax.instance_norm(X4, axis=(1, 3))
    chex.assert_trees_all_close(y, bnjax.layer_norm(X4, reduction_axes=2, feature_axes=(1, 3)))


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_lists_are_accepted_as_scale_and_bias(name):
    channels = 8 if name in ("group_norm", "instance_norm") else 3
    scale, bias = [1.0 + c for c in range(channels)], [0.5] * channels
    chex.assert_trees_all_close(
        NORMALIZERS[name](scale=scale, bias=bias),
        NORMALIZERS[name](scale=jnp.asarray(scale), bias=jnp.asarray(bias)),
    )


@pytest.mark.parametrize("call", [_bn, _renorm], ids=["batch_norm", "batch_renorm"])
def test_list_statistics_are_refused(call):
    state = STATE if call is _bn else RENORM_STATE
    with pytest.raises(TypeError, match=r"`state\.mean` must be an array.*_state"):
        call(state=state._replace(mean=[0.0, 0.0, 0.0]))


def test_python_int_counters_are_accepted():
    _, state = _bn(state=bnjax.BatchNormState(jnp.zeros(3), jnp.ones(3), 0, 0))
    assert state.count.dtype == jnp.int32 and int(state.count) == 1
    _, renorm = _renorm(state=RENORM_STATE._replace(count=0, skipped=0, step=np.int64(0)))
    assert int(renorm.step) == 1 and int(renorm.count) == 1
    with pytest.raises(TypeError, match=r"`state\.count` must be an integer counter"):
        _bn(state=STATE._replace(count=0.0))


# --------------------------------------------------------------------------------------------
# 4. Model widths.


def _resnet(widths):
    return models.ResNet(stage_sizes=(1,) * max(len(widths), 1), stage_features=widths)


@pytest.mark.parametrize("widths", [(0,), (8, -4), (), (8.0,), (True,)])
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda w: models.MLP(features=w), "features"),
        (lambda w: models.SmallCNN(features=w), "features"),
        (_resnet, "stage_features"),
    ],
    ids=["mlp", "cnn", "resnet"],
)
def test_model_widths_must_be_positive_ints(make, field, widths):
    x = jnp.ones((2, 4, 4, 1))
    with pytest.raises(ValueError, match=rf"`{field}`=.*positive ints.*model_features"):
        jax.eval_shape(lambda: make(widths).init(jax.random.key(0), x, train=False))


# --------------------------------------------------------------------------------------------
# 5. shard_map_step with a step that forgot its axis_name.


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py)")
def test_shard_map_step_names_the_forgotten_axis_name():
    def forgetful_step(bn_state, x, axis_name):
        del axis_name  # statistics of each device's rows only: the copies differ
        _, bn_state = bnjax.batch_norm(x, bn_state, training=True)
        return bn_state, {}

    run = parallel.shard_map_step(forgetful_step, parallel.data_mesh(2))
    with pytest.raises(ValueError, match=r"state\.mean.*`axis_name`.*lax\.pmean") as error:
        run(STATE, jnp.concatenate([X, X + 1.0]))
    assert "Do not turn off check_vma" in str(error.value)
    assert "check_vma=False" not in str(error.value)


# --------------------------------------------------------------------------------------------
# 6. Running statistics that come in non-finite.


def _poisoned(state, field, value=float("nan")):
    return state._replace(**{field: getattr(state, field).at[1].set(value)})


@pytest.mark.parametrize("field", ["mean", "var"])
def test_known_non_finite_state_raises_in_training(field):
    with pytest.raises(ValueError, match=rf"`state\.{field}` are not finite.*reset_statistics"):
        _bn(state=_poisoned(STATE, field))
    y, _ = _bn(state=_poisoned(STATE, field), training=False)  # evaluation reads no values
    assert y.shape == X.shape


@pytest.mark.parametrize("field", ["renorm_mean", "renorm_var", "var"])
def test_known_non_finite_renorm_state_raises_in_training(field):
    with pytest.raises(ValueError, match=rf"`state\.{field}` are not finite"):
        _renorm(state=_poisoned(RENORM_STATE, field, float("inf")))


def _assert_frozen(new, old):
    chex.assert_trees_all_equal(new, old)  # unchanged: neither counted nor skipped


def test_traced_non_finite_state_is_left_unchanged_and_flagged():
    step = jax.jit(lambda state: _bn(state=state)[1])
    poisoned = _poisoned(STATE, "var")
    with pytest.warns(RuntimeWarning, match=r"`state\.var` are not finite.*neither counted"):
        new = jax.block_until_ready(step(poisoned))
    _assert_frozen(new, poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite state: no warning, the batch is counted
        assert int(jax.block_until_ready(step(STATE)).count) == 1
    # A batch whose own statistics are not finite is still counted as skipped.
    assert int(jax.jit(lambda x: _bn(x=x)[1].skipped)(X.at[0, 0].set(jnp.inf))) == 1


def test_traced_non_finite_renorm_state_is_left_unchanged_and_flagged():
    poisoned = _poisoned(RENORM_STATE, "renorm_var")
    with pytest.warns(RuntimeWarning, match=r"batch_renorm.*`state\.renorm_var`"):
        new = jax.jit(lambda state: _renorm(state=state)[1])(poisoned)
        jax.block_until_ready(new)
    _assert_frozen(new, poisoned)


def test_non_finite_state_under_vmap_and_grad():
    states = jax.tree.map(lambda *s: jnp.stack(s), STATE, _poisoned(STATE, "mean"), STATE)

    def loss(x, state):
        y, new = _bn(x=x, state=state)
        return jnp.sum(y**2), new

    run = jax.jit(jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0)))
    with pytest.warns(RuntimeWarning, match=r"`state\.mean`") as record:
        grads, new = jax.block_until_ready(run(X, states))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert new.count.tolist() == [1, 0, 1] and new.skipped.tolist() == [0, 0, 0]
    assert bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py)")
def test_non_finite_state_under_pmap():
    run = jax.pmap(
        lambda x, s: _bn(x=x, state=s, axis_name="d")[1], axis_name="d", devices=jax.devices()[:2]
    )
    poisoned = jax.tree.map(lambda a: jnp.stack([a, a]), _poisoned(STATE, "var"))
    with pytest.warns(RuntimeWarning, match=r"`state\.var`"):
        new = jax.block_until_ready(run(jnp.stack([X, X + 1.0]), poisoned))
    _assert_frozen(new, poisoned)


def test_a_traced_state_adds_one_conditional_and_a_known_one_nothing():
    def compiled(fun, *args):
        return jax.jit(fun).lower(*args).compile().as_text()

    traced = compiled(lambda state: _bn(state=state), STATE)
    closed_over = compiled(lambda x: _bn(x=x), X)  # checked once, at trace time
    expected = 1 if jax.default_backend() in ("cpu", "tpu") else 0
    assert traced.count(" conditional(") == expected
    assert " conditional(" not in closed_over and "callback" not in closed_over
    # No effects: a jitted step with one (even a debug callback never reached) leaves JAX's
    # fast dispatch path on every call.
    assert not jax.make_jaxpr(lambda state: _bn(state=state))(STATE).effects


def test_nnx_group_norm_takes_numpy_integers():
    from flax import nnx

    from bnjax import nnx as bnx

    layer = bnx.GroupNorm(4, num_groups=np.int64(2), rngs=nnx.Rngs(0))
    assert layer.num_groups == 2 and layer.group_size == 2
    with pytest.raises(ValueError, match="must divide num_features=4"):
        bnx.GroupNorm(4, num_groups=np.int64(3), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# 7. States, flags and parameters that used to pass silently.


@pytest.mark.parametrize("training", [False, True], ids=["evaluation", "training"])
def test_known_negative_running_variance_is_refused(training):
    state = STATE._replace(var=STATE.var.at[1].set(-0.5))
    with pytest.raises(ValueError, match=r"`state\.var` is negative.*recalibrate") as error:
        _bn(state=state, training=training)
    assert "validate_statistics" in str(error.value)
    renorm = RENORM_STATE._replace(renorm_var=RENORM_STATE.renorm_var.at[0].set(-1.0))
    with pytest.raises(ValueError, match=r"`state\.renorm_var` is negative"):
        _renorm(state=renorm)
    with pytest.raises(ValueError, match=r"`state\.var` is negative"):
        _renorm(state=RENORM_STATE._replace(var=state.var), training=False)


def test_a_traced_negative_running_variance_is_not_read():
    """Under jit with the state as an argument the values are not known: no check, no cost."""
    state = STATE._replace(var=STATE.var.at[1].set(-0.5))
    y, _ = jax.jit(lambda state: _bn(state=state, training=False))(state)
    assert y.shape == X.shape


@pytest.mark.parametrize("field", ["count", "skipped"])
def test_counters_must_be_scalars(field):
    state = STATE._replace(**{field: jnp.zeros((4,), jnp.int32)})
    with pytest.raises(ValueError, match=rf"`state\.{field}` must be a scalar.*shape \(4,\)"):
        _bn(state=state)
    with pytest.raises(ValueError, match=r"`state\.step` must be a scalar"):
        _renorm(state=RENORM_STATE._replace(step=np.zeros((2,), np.int32)))


@pytest.mark.parametrize("call", [_bn, _renorm], ids=["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("flag", ["False", 1, None], ids=["string", "int", "none"])
def test_use_unbiased_running_var_must_be_a_bool(call, flag):
    with pytest.raises(TypeError, match="`use_unbiased_running_var` must be True or False"):
        call(use_unbiased_running_var=flag)


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
@pytest.mark.parametrize("param", ["scale", "bias"])
def test_complex_parameters_on_real_input_are_refused(name, param):
    channels = 8 if name in ("group_norm", "instance_norm") else 3
    value = jnp.full((channels,), 1.0 + 2.0j, jnp.complex64)
    with pytest.raises(TypeError, match=rf"`{param}` is complex.*real"):
        NORMALIZERS[name](**{param: value})


def test_complex_parameters_on_complex_input_are_used():
    x = X.astype(jnp.complex64) * (1.0 + 1.0j)
    bias = jnp.full((3,), 2.0j, jnp.complex64)
    y, _ = _bn(x=x, bias=bias)
    np.testing.assert_allclose(jnp.mean(y, axis=0), bias, atol=1e-5)


def test_zero_features_are_a_valid_state():
    state = bnjax.batch_norm_state(0)
    assert state.mean.shape == (0,)
    x = jnp.ones((8, 0))
    y, new = bnjax.batch_norm(x, state, training=True)
    assert y.shape == (8, 0) and int(new.count) == 1 and int(new.skipped) == 0
    y, same = bnjax.batch_norm(x, new, training=False)
    assert y.shape == (8, 0) and same is new
    y, renorm = bnjax.batch_renorm(x, bnjax.batch_renorm_state(0), training=True)
    assert y.shape == (8, 0) and int(renorm.step) == 1
    with pytest.raises(ValueError, match="`num_features` must be non-negative"):
        bnjax.batch_norm_state(-1)


def test_group_norm_on_one_dimensional_input_names_its_shape():
    with pytest.raises(ValueError, match=r"\(N, \.\.\., C\).*shape \(8,\)") as error:
        bnjax.group_norm(jnp.ones(8), num_groups=2)
    assert "`axis`" not in str(error.value)
    # An unbatched input is fine when its reduction axes are given (flax's rule).
    y = bnjax.group_norm(jnp.arange(8.0), num_groups=2, reduction_axes=0)
    np.testing.assert_allclose(y.reshape(2, 4).mean(axis=1), 0.0, atol=1e-6)
