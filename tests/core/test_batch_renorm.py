"""Batch renormalization: equals batch norm when clipping is off, the gradient holds r and d
constant, evaluation is batch norm's, devices agree, and the clipping bounds are exact."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax
from bnjax.core.batch_norm import batch_norm, batch_norm_state
from bnjax.core.batch_renorm import (
    BatchRenormState,
    RenormSchedule,
    batch_renorm,
    batch_renorm_state,
)

_OPTIONS = ("training", "momentum", "renorm_momentum", "epsilon", "r_max", "d_max", "schedule")
_LAYOUT = ("axis", "axis_name", "ghost_batch_size", "use_unbiased_running_var")
# Jitted for speed: eager dispatch compiles every small op on its own.
renorm_jit = jax.jit(batch_renorm, static_argnames=_OPTIONS + _LAYOUT)
norm_jit = jax.jit(batch_norm, static_argnames=("training", "momentum", "epsilon", *_LAYOUT))


def _state(num_features, seed=0, step=0, dtype=jnp.float32):
    """A used state whose renorm statistics are far enough from the batches for r, d to matter."""
    rng = np.random.default_rng(seed)  # numpy: no compilation per shape
    shape = (num_features,) if isinstance(num_features, int) else num_features
    return BatchRenormState(
        mean=jnp.asarray(0.3 * rng.normal(size=shape), dtype),
        var=jnp.asarray(rng.uniform(0.5, 2.0, shape), dtype),
        renorm_mean=jnp.asarray(rng.normal(size=shape), dtype),
        renorm_var=jnp.asarray(rng.uniform(0.2, 4.0, shape), dtype),
        count=jnp.int32(3),
        skipped=jnp.int32(1),
        step=jnp.int32(step),
    )


def _inputs(shape, channels, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(1.5 * rng.normal(size=shape) + 0.7, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, channels), dtype)
    bias = jnp.asarray(rng.normal(size=channels), dtype)
    weight = jnp.asarray(rng.normal(size=shape), dtype)
    return x, scale, bias, weight


def _value_and_grads(fn, x, scale, bias, weight):
    """((y, state), (dx, dscale, dbias)) of the loss sum(y * weight), jitted."""

    def loss(x, scale, bias):
        y, state = fn(x, scale, bias)
        return jnp.sum(y * weight), (y, state)

    grads, aux = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
    return aux, grads


def _renorm_part(state):
    return state.renorm_mean, state.renorm_var


CASES = {
    "dense": dict(shape=(16, 6), kwargs={}),
    "nhwc_mask": dict(
        shape=(8, 3, 3, 4), kwargs=dict(mask=(jnp.arange(8) % 3 != 1)[:, None, None, None])
    ),
    "nchw_ghost": dict(shape=(8, 4, 3, 3), kwargs=dict(axis=1, ghost_batch_size=4)),
    "unbiased_cumulative": dict(
        shape=(12, 5), kwargs=dict(use_unbiased_running_var=True, momentum=None)
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_without_clipping_room_it_is_batch_norm(case):
    shape, kwargs = CASES[case]["shape"], CASES[case]["kwargs"]
    channels = shape[kwargs.get("axis", -1)]
    x, scale, bias, weight = _inputs(shape, channels)
    state = _state(channels)
    renorm_momentum = 0.8

    def renorm(x, scale, bias):
        return batch_renorm(
            x,
            state,
            scale,
            bias,
            training=True,
            r_max=1.0,
            d_max=0.0,
            renorm_momentum=renorm_momentum,
            **kwargs,
        )

    def plain(x, scale, bias):
        return batch_norm(x, state.as_batch_norm_state(), scale, bias, training=True, **kwargs)

    (y, new_state), grads = _value_and_grads(renorm, x, scale, bias, weight)
    (y_bn, state_bn), grads_bn = _value_and_grads(plain, x, scale, bias, weight)
    # Equal up to float32 rounding: XLA may fuse scale * r (r = 1) in another order.
    chex.assert_trees_all_close(y, y_bn, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads, grads_bn, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(new_state.as_batch_norm_state(), state_bn, rtol=1e-6, atol=0)
    assert new_state.step == state.step + 1
    # The renorm statistics follow batch norm's biased update with renorm_momentum.
    kwargs = {**kwargs, "use_unbiased_running_var": False, "momentum": renorm_momentum}
    renorm_as_bn = state.as_batch_norm_state()._replace(
        mean=state.renorm_mean, var=state.renorm_var
    )
    _, expected = norm_jit(x, renorm_as_bn, scale, bias, training=True, **kwargs)
    chex.assert_trees_all_close(_renorm_part(new_state), (expected.mean, expected.var))


def test_schedule_bounds():
    schedule = RenormSchedule(warmup_steps=10, r_max=3.0, r_relax_steps=20, d_max=5.0)
    schedule = schedule._replace(d_relax_steps=10)
    steps = jnp.array([0, 9, 10, 15, 20, 30, 100])
    r_max, d_max = jax.jit(jax.vmap(schedule.bounds))(steps)
    np.testing.assert_allclose(r_max, [1, 1, 1, 1.5, 2, 3, 3])
    np.testing.assert_allclose(d_max, [0, 0, 0, 2.5, 5, 5, 5])
    jump = RenormSchedule(warmup_steps=10, r_relax_steps=0, d_relax_steps=0)
    r_max, d_max = jax.vmap(jump.bounds)(jnp.array([9, 10, 11]))
    np.testing.assert_allclose(r_max, [1, 3, 3])
    np.testing.assert_allclose(d_max, [0, 5, 5])


def test_state_step_drives_the_default_schedule():
    x, scale, bias, _ = _inputs((16, 6), 6)

    def run(step, **bounds):
        return renorm_jit(x, _state(6, step=step), scale, bias, training=True, **bounds)[0]

    y_bn, _ = norm_jit(x, _state(6).as_batch_norm_state(), scale, bias, training=True)
    warmup = RenormSchedule().warmup_steps
    chex.assert_trees_all_close(run(0), y_bn, rtol=0, atol=0)
    chex.assert_trees_all_close(run(warmup), y_bn, rtol=0, atol=0)
    assert not np.allclose(run(warmup + 2_000), y_bn, atol=1e-3)
    chex.assert_trees_all_close(run(10**6), run(0, r_max=3.0, d_max=5.0))


def _reference(x, scale, bias, renorm_mean, renorm_var, r_max, d_max, epsilon, stop=True):
    """The paper's formula on a (N, ..., C) input in plain jnp (autodiff, no custom VJP)."""
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    sigma_batch, sigma = jnp.sqrt(var + epsilon), jnp.sqrt(renorm_var + epsilon)
    r = jnp.clip(sigma_batch / sigma, 1 / r_max, r_max)
    d = jnp.clip((mean - renorm_mean) / sigma, -d_max, d_max)
    if stop:
        r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
    return scale * ((x - mean) / sigma_batch * r + d) + bias


def test_gradient_holds_r_and_d_constant_float64():
    with jax.enable_x64(True):
        x, scale, bias, weight = _inputs((10, 3, 2, 6), 6, dtype=jnp.float64)
        # Channels 0-1 leave r and d unclipped, the others clip one or both.
        renorm_mean = jnp.array([0.6, 0.8, 5.0, 0.7, -4.0, 0.5], jnp.float64)
        renorm_var = jnp.array([2.0, 2.5, 2.0, 40.0, 0.1, 0.05], jnp.float64)
        state = batch_renorm_state(6)._replace(renorm_mean=renorm_mean, renorm_var=renorm_var)
        bounds = dict(r_max=1.5, d_max=0.5)

        def renorm(x, scale, bias):
            return batch_renorm(x, state, scale, bias, training=True, epsilon=1e-3, **bounds)

        def reference(x, scale, bias, stop=True):
            y = _reference(
                x, scale, bias, renorm_mean, renorm_var, epsilon=1e-3, stop=stop, **bounds
            )
            return y, None

        (y, _), grads = _value_and_grads(renorm, x, scale, bias, weight)
        (y_ref, _), grads_ref = _value_and_grads(reference, x, scale, bias, weight)
        chex.assert_trees_all_close(y, y_ref, rtol=1e-12, atol=1e-12)
        chex.assert_trees_all_close(grads, grads_ref, rtol=1e-10, atol=1e-12)
        # The test can tell: letting the gradient through r and d changes dx.
        through = jax.tree_util.Partial(reference, stop=False)
        _, grads_through = _value_and_grads(through, x, scale, bias, weight)
        assert not np.allclose(grads[0], grads_through[0], atol=1e-3)


def test_check_grads_float64():
    with jax.enable_x64(True):
        x, scale, bias, _ = _inputs((8, 5), 5, dtype=jnp.float64)
        # Renorm statistics far from the batch: r and d sit on their bounds, so they are
        # constant near x and finite differences see the same function as the gradient.
        clipped = batch_renorm_state(5)._replace(
            renorm_mean=jnp.full(5, -20.0, jnp.float64), renorm_var=jnp.full(5, 100.0, jnp.float64)
        )

        @jax.jit
        def f(x, scale, bias):
            return batch_renorm(x, clipped, scale, bias, training=True, r_max=1.5, d_max=0.5)[0]

        check_grads(f, (x, scale, bias), order=2, modes=["rev"])
        # Unclipped r and d depend on x, which the gradient ignores by design: check the
        # parameters only.
        free = _state(5, dtype=jnp.float64)

        @jax.jit
        def g(scale, bias):
            inf = float("inf")
            return batch_renorm(x, free, scale, bias, training=True, r_max=inf, d_max=inf)[0]

        check_grads(g, (scale, bias), order=2, modes=["rev"])


def test_evaluation_is_batch_norm_evaluation():
    x, scale, bias, _ = _inputs((6, 4, 4, 3), 3)
    state = _state(3)
    y, same = renorm_jit(x, state, scale, bias, training=False, r_max=2.0, d_max=1.0)
    y_bn, _ = norm_jit(x, state.as_batch_norm_state(), scale, bias, training=False)
    chex.assert_trees_all_close(y, y_bn, rtol=0, atol=0)
    chex.assert_trees_all_equal(same, state)
    assert batch_renorm(x, state, training=False)[1] is state


def test_unclipped_training_normalizes_with_the_running_statistics():
    """The point of renorm: with r, d unclipped, training output = evaluation output."""
    x, scale, bias, _ = _inputs((32, 5), 5)
    state = _state(5)
    state = state._replace(renorm_mean=state.mean, renorm_var=state.var)
    inf = float("inf")
    y_train, _ = renorm_jit(x, state, scale, bias, training=True, r_max=inf, d_max=inf)
    y_eval, _ = renorm_jit(x, state, scale, bias, training=False)
    chex.assert_trees_all_close(y_train, y_eval, rtol=1e-5, atol=1e-5)


def test_state_update_uses_each_momentum():
    x, _, _, _ = _inputs((20, 4), 4)
    state = _state(4)
    _, new = renorm_jit(
        x,
        state,
        training=True,
        momentum=0.9,
        renorm_momentum=0.5,
        r_max=2.0,
        d_max=1.0,
        use_unbiased_running_var=True,
    )
    mean, biased, unbiased = x.mean(0), x.var(0), x.var(0, ddof=1)
    chex.assert_trees_all_close(new.mean, 0.9 * state.mean + 0.1 * mean, rtol=1e-6)
    chex.assert_trees_all_close(new.var, 0.9 * state.var + 0.1 * unbiased, rtol=1e-6)
    chex.assert_trees_all_close(new.renorm_mean, 0.5 * state.renorm_mean + 0.5 * mean, rtol=1e-6)
    chex.assert_trees_all_close(new.renorm_var, 0.5 * state.renorm_var + 0.5 * biased, rtol=1e-6)
    assert (new.count, new.skipped, new.step) == (4, 1, 1)
    assert new.mean.dtype == jnp.float32


DELTA = 2.0**-10


@pytest.mark.parametrize("bound", [2 * (1 - DELTA), 2.0, 2 * (1 + DELTA)])
def test_clipping_engages_exactly_at_the_bounds(bound):
    # Two examples at -1 and +1: batch mean 0 and variance 1 exactly (epsilon=1e-30 vanishes
    # next to it in float32; 0 itself is refused), so
    # sigma_B / sigma = 1 / sqrt(renorm_var), and y = (-r + d, r + d) when scale=1, bias=0.
    x = jnp.array([[-1.0] * 5, [1.0] * 5])
    ratio = np.array([0.25, 0.5, 1.0, 2.0, 4.0], np.float32)
    state = batch_renorm_state(5)._replace(renorm_var=jnp.asarray(1 / ratio**2))
    y, _ = renorm_jit(x, state, training=True, epsilon=1e-30, r_max=bound, d_max=float("inf"))
    r, d = (y[1] - y[0]) / 2, (y[1] + y[0]) / 2
    bound32 = np.float32(bound)
    np.testing.assert_allclose(r, np.clip(ratio, 1 / bound32, bound32), rtol=1e-7)
    np.testing.assert_array_equal(d, 0.0)
    # Now d: batch means m with variance 1 against renorm mean 0 and variance 1 (so r = 1).
    shift = np.array([-4.0, -2.0, 0.0, 2.0, 4.0], np.float32)
    y, _ = renorm_jit(
        x + shift,
        batch_renorm_state(5),
        training=True,
        epsilon=1e-30,
        r_max=float("inf"),
        d_max=bound,
    )
    r, d = (y[1] - y[0]) / 2, (y[1] + y[0]) / 2
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_allclose(d, np.clip(shift, -bound32, bound32), rtol=1e-7)


def _sharded_vs_single(mesh, x, mask, state, scale, bias, weight, **kwargs):
    spec = jax.P("batch")

    def local(x, mask, scale, bias, axis_name=None):
        return batch_renorm(
            x, state, scale, bias, training=True, mask=mask, axis_name=axis_name, **kwargs
        )

    def sharded(x, scale, bias):
        mapped = jax.shard_map(
            jax.tree_util.Partial(local, axis_name="batch"),
            mesh=mesh,
            in_specs=(spec, spec, jax.P(), jax.P()),
            out_specs=(spec, jax.P()),
        )
        return mapped(x, jax.device_put(mask, jax.NamedSharding(mesh, spec)), scale, bias)

    x_sharded = jax.device_put(x, jax.NamedSharding(mesh, spec))
    many = _value_and_grads(sharded, x_sharded, scale, bias, weight)
    one = _value_and_grads(lambda *a: local(a[0], mask, *a[1:]), x, scale, bias, weight)
    return many, one


@pytest.mark.parametrize("ghost", [None, 4])
def test_eight_devices_equal_one(ghost):
    """Synced statistics (or per-device ghost batches) over 8 devices = one device."""
    mesh = jax.make_mesh((8,), ("batch",))
    x, scale, bias, weight = _inputs((32, 3, 4), 4)
    # Ragged: devices hold different numbers of valid examples (per example, as in flax).
    mask = (jnp.arange(32) % 5 != 2)[:, None, None]
    state = _state(4)
    kwargs = dict(r_max=1.5, d_max=0.5, ghost_batch_size=ghost)
    many, one = _sharded_vs_single(mesh, x, mask, state, scale, bias, weight, **kwargs)
    chex.assert_trees_all_close(many, one, rtol=2e-5, atol=2e-5)


def test_pmap_device_groups_each_equal_one_device():
    x, scale, bias, _ = _inputs((8, 2, 3), 3)
    state = _state(3)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def local(x, axis_name=None, groups=None):
        return batch_renorm(
            x,
            state,
            scale,
            bias,
            training=True,
            r_max=1.5,
            d_max=0.5,
            axis_name=axis_name,
            axis_index_groups=groups,
        )

    grouped = jax.tree_util.Partial(local, axis_name="batch", groups=groups)
    y, new = jax.pmap(grouped, axis_name="batch")(x)
    for group in map(np.array, groups):
        y_one, new_one = jax.jit(local)(x[group].reshape(8, 3))
        chex.assert_trees_all_close(y[group].reshape(8, 3), y_one, rtol=2e-5, atol=2e-5)
        first = jax.tree.map(lambda leaf, i=group[0]: leaf[i], new)
        chex.assert_trees_all_close(first, new_one, rtol=2e-5, atol=2e-5)


def test_non_finite_batch_updates_nothing_but_skipped():
    x, _, _, _ = _inputs((8, 3), 3)
    state = _state(3)
    _, new = renorm_jit(x.at[2, 1].set(jnp.nan), state, training=True)
    chex.assert_trees_all_close(new, state._replace(skipped=state.skipped + 1))
    # Masked-out garbage is fine.
    mask = (jnp.arange(8) != 2)[:, None]
    _, new = renorm_jit(x.at[2, 1].set(jnp.nan), state, training=True, mask=mask)
    assert (new.skipped, new.step) == (state.skipped, state.step + 1)
    # Unbiased variance of a single valid example is undefined: both sets skip together.
    one_valid = (jnp.arange(8) == 0)[:, None]
    _, new = renorm_jit(x, state, training=True, mask=one_valid, use_unbiased_running_var=True)
    chex.assert_trees_all_close(new, state._replace(skipped=state.skipped + 1))


def test_low_precision_input():
    x, scale, bias, _ = _inputs((16, 2, 2, 8), 8)
    state = _state(8)
    y16, s16 = renorm_jit(x.astype(jnp.bfloat16), state, scale, bias, training=True)
    y32, s32 = renorm_jit(x, state, scale, bias, training=True)
    assert y16.dtype == jnp.bfloat16 and s16.mean.dtype == jnp.float32
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=5e-2, rtol=2e-2)
    chex.assert_trees_all_close(s16, s32, atol=1e-2, rtol=1e-2)


def test_compiled_gradient_reduces_x_as_often_as_batch_norm():
    """r and d need the batch moments before the kernel; XLA must merge the duplicates."""
    x, scale, bias, weight = _inputs((16, 4, 4, 8), 8)
    state = _state(8)

    def reduces(fn):
        loss = lambda x, s, b: jnp.sum(fn(x, s, b)[0] * weight)  # noqa: E731
        hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, scale, bias).compile().as_text()
        return len(re.findall(r"\breduce\(", hlo))

    bn_state = state.as_batch_norm_state()
    bn = reduces(lambda x, s, b: batch_norm(x, bn_state, s, b, training=True))
    rn = reduces(lambda x, s, b: batch_renorm(x, state, s, b, training=True, r_max=2.0, d_max=1.0))
    assert rn == bn


def _bad(**kwargs):
    x = kwargs.pop("x", jnp.ones((4, 3)))
    state = kwargs.pop("state", batch_renorm_state(3))
    return lambda: batch_renorm(x, state, training=kwargs.pop("training", True), **kwargs)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (_bad(state=batch_norm_state(3)), TypeError, "BatchRenormState"),
        (
            _bad(state=batch_renorm_state(3)._replace(renorm_var=jnp.ones(4))),
            ValueError,
            r"state\.renorm_var",
        ),
        (_bad(r_max=0.5, d_max=1.0), ValueError, "r_max"),
        (_bad(r_max=2.0, d_max=-1.0), ValueError, "d_max"),
        (_bad(r_max=float("nan"), d_max=1.0), ValueError, "r_max"),
        (_bad(r_max=2.0), ValueError, "both"),
        (_bad(r_max=2.0, d_max=1.0, schedule=RenormSchedule()), ValueError, "not both"),
        (_bad(schedule=RenormSchedule(r_max=0.9)), ValueError, r"schedule\.r_max"),
        (_bad(schedule=RenormSchedule(warmup_steps=-1)), ValueError, "warmup_steps"),
        (_bad(schedule=(3.0, 5.0)), TypeError, "RenormSchedule"),
        (_bad(renorm_momentum=1.5), ValueError, "renorm_momentum"),
        (_bad(momentum=1.5), ValueError, "momentum"),
        (_bad(scale=jnp.ones(4)), ValueError, "scale"),
        (_bad(x=jnp.ones((4, 3), jnp.int32)), TypeError, "floating"),
        (_bad(x=jnp.ones((1, 3))), ValueError, "single value"),
        (_bad(axis_name="batch"), ValueError, "not bound"),
        (_bad(ghost_batch_size=3), ValueError, "ghost_batch_size"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_public_names():
    assert bnjax.batch_renorm is batch_renorm
    assert bnjax.batch_renorm_state is batch_renorm_state
    assert bnjax.BatchRenormState is BatchRenormState
    assert bnjax.RenormSchedule is RenormSchedule
    state = bnjax.batch_renorm_state((2, 3))
    assert state.renorm_mean.shape == (2, 3) and state.step.dtype == jnp.int32
