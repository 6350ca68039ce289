"""Synchronised statistics over 8 CPU devices equal one device on the whole batch.

conftest.py gives the CPU backend 8 devices. Under pmap, parameter gradients are per device
(sum them, as a data-parallel step does); under shard_map with a replicated scale, autodiff
already sums them, so they are compared directly.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

DEVICES = 8
PER_DEVICE = 3
SHAPE = (DEVICES * PER_DEVICE, 2, 2, 4)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], SHAPE) * 3.0 + 2.0
    cotangent = jax.random.normal(keys[1], SHAPE)
    scale = jax.random.normal(keys[2], (4,)) + 1.0
    bias = jax.random.normal(keys[3], (4,))
    return x, cotangent, scale, bias


def _loss(x, scale, bias, cotangent, mask=None, **options):
    y, state = bnjax.batch_norm(
        x, bnjax.batch_norm_state(4), scale, bias, training=True, mask=mask, **options
    )
    return jnp.sum(jnp.sin(y) * cotangent), (y, state)


def _single_device(x, cotangent, scale, bias, mask=None, **options):
    grad_fn = jax.grad(_loss, (0, 1, 2), has_aux=True)
    grads, (y, state) = grad_fn(x, scale, bias, cotangent, mask, **options)
    return y, state, grads


def _split(array):
    return array.reshape((DEVICES, -1) + array.shape[1:])


def _pmapped(x, cotangent, scale, bias, mask=None, **options):
    def step(x, cotangent, mask):
        grads, (y, state) = jax.grad(_loss, (0, 1, 2), has_aux=True)(
            x, scale, bias, cotangent, mask, **options
        )
        return y, state, grads

    mask_axis = None if mask is None else 0
    mask = None if mask is None else _split(mask)
    y, state, grads = jax.pmap(step, axis_name="batch", in_axes=(0, 0, mask_axis))(
        _split(x), _split(cotangent), mask
    )
    dx, dscale, dbias = grads
    return y.reshape(SHAPE), state, (dx.reshape(SHAPE), dscale.sum(0), dbias.sum(0))


@pytest.mark.parametrize("ragged", [False, True])
def test_pmap_sync_equals_one_device(ragged):
    x, cotangent, scale, bias = _inputs()
    mask = None
    if ragged:  # device 2 has no valid example, the others 1 to 3
        mask = jnp.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1] + [1, 0, 1] * 4, bool)
        mask = mask.reshape(-1, 1, 1, 1)  # per example, as in flax
    y, state, grads = _single_device(x, cotangent, scale, bias, mask)
    y_p, state_p, grads_p = _pmapped(x, cotangent, scale, bias, mask, axis_name="batch")
    chex.assert_trees_all_close(y_p, y, atol=1e-5)
    for device in range(DEVICES):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, d=device: a[d], state_p), state, atol=1e-6, rtol=1e-6
        )
    chex.assert_trees_all_close(grads_p, grads, atol=1e-5, rtol=1e-5)


def test_shard_map_sync_equals_one_device():
    x, cotangent, scale, bias = _inputs()
    y, state, grads = _single_device(x, cotangent, scale, bias)
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    sharded = NamedSharding(mesh, P("batch"))

    def step(x, cotangent, scale, bias):
        grads, (y, state) = jax.grad(_loss, (0, 1, 2), has_aux=True)(
            x, scale, bias, cotangent, axis_name="batch"
        )
        return y, state, grads

    run = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P(), P()),
            out_specs=(P("batch"), P(), (P("batch"), P(), P())),
        )
    )
    y_s, state_s, grads_s = run(
        jax.device_put(x, sharded), jax.device_put(cotangent, sharded), scale, bias
    )
    chex.assert_trees_all_close(y_s, y, atol=1e-5)
    chex.assert_trees_all_close(state_s, state, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads_s, grads, atol=1e-5, rtol=1e-5)


def test_jit_with_sharded_batch_is_global_by_construction():
    x, cotangent, scale, bias = _inputs()
    y, state, grads = _single_device(x, cotangent, scale, bias)
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    sharded = NamedSharding(mesh, P("batch"))
    run = jax.jit(_single_device)
    y_j, state_j, grads_j = run(
        jax.device_put(x, sharded), jax.device_put(cotangent, sharded), scale, bias
    )
    chex.assert_trees_all_close((y_j, state_j, grads_j), (y, state, grads), atol=1e-5, rtol=1e-5)


def test_local_mode_equals_independent_devices_and_ghost_batches():
    x, cotangent, scale, bias = _inputs()
    y_p, state_p, _ = _pmapped(x, cotangent, scale, bias)  # no axis_name: per-device stats
    for device, chunk in enumerate(_split(x)):
        y_d, state_d, _ = _single_device(chunk, _split(cotangent)[device], scale, bias)
        chex.assert_trees_all_close(_split(y_p)[device], y_d, atol=1e-5)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, d=device: a[d], state_p), state_d, atol=1e-6
        )
    # One device with ghost batches of the per-device size gives the same outputs, and a state
    # that is the average of the 8 device states.
    y_g, state_g, _ = _single_device(x, cotangent, scale, bias, ghost_batch_size=PER_DEVICE)
    chex.assert_trees_all_close(y_g, y_p, atol=1e-5)
    chex.assert_trees_all_close(state_g.mean, state_p.mean.mean(0), atol=1e-6)
    chex.assert_trees_all_close(state_g.var, state_p.var.mean(0), rtol=1e-6)


def test_ghost_batches_with_axis_name_sync_only_the_running_average():
    x, cotangent, scale, bias = _inputs()
    y_g, state_g, grads_g = _single_device(x, cotangent, scale, bias, ghost_batch_size=PER_DEVICE)
    y_p, state_p, grads_p = _pmapped(
        x, cotangent, scale, bias, axis_name="batch", ghost_batch_size=PER_DEVICE
    )
    chex.assert_trees_all_close(y_p, y_g, atol=1e-5)
    chex.assert_trees_all_close(state_p.mean[3], state_g.mean, atol=1e-6)
    chex.assert_trees_all_close(state_p.var[5], state_g.var, rtol=1e-6)
    chex.assert_trees_all_close(grads_p, grads_g, atol=1e-5, rtol=1e-5)


def test_axis_index_groups_sync_within_each_group():
    x, cotangent, scale, bias = _inputs()
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    y_p, state_p, _ = _pmapped(
        x, cotangent, scale, bias, axis_name="batch", axis_index_groups=groups
    )
    half = SHAPE[0] // 2
    for group, rows in enumerate((slice(0, half), slice(half, None))):
        y_h, state_h, _ = _single_device(x[rows], cotangent[rows], scale, bias)
        chex.assert_trees_all_close(y_p[rows], y_h, atol=1e-5)
        device = groups[group][0]
        chex.assert_trees_all_close(state_p.mean[device], state_h.mean, atol=1e-6)
        np.testing.assert_allclose(state_p.var[device], state_h.var, rtol=1e-6)


def _shard_map(fun, out_specs):
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    return jax.shard_map(fun, mesh=mesh, in_specs=P("batch"), out_specs=out_specs), mesh


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_a_closed_over_state_works_inside_shard_map(training):
    """A state closed over (a constant of the traced function) is checked on its values, as
    in an eager call, instead of crashing on the way there."""
    x, _, scale, bias = _inputs()
    state = bnjax.batch_norm_state(4)._replace(var=jnp.full((4,), 2.0))

    def closed_over(x):
        return bnjax.batch_norm(x, state, scale, bias, training=training, axis_name="batch")

    def passed(x, state):
        return bnjax.batch_norm(x, state, scale, bias, training=training, axis_name="batch")

    run, mesh = _shard_map(closed_over, (P("batch"), P()))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    reference = jax.shard_map(
        passed, mesh=mesh, in_specs=(P("batch"), P()), out_specs=(P("batch"), P())
    )(x, state)
    chex.assert_trees_all_close(run(x), reference, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(run)(x), reference, atol=1e-6, rtol=1e-6)
    # Its values are still checked, as outside shard_map.
    negative = state._replace(var=state.var.at[0].set(-1.0))
    with pytest.raises(ValueError, match=r"`state\.var` is negative"):
        _shard_map(
            lambda x: bnjax.batch_norm(x, negative, training=training, axis_name="batch"),
            (P("batch"), P()),
        )[0](x)


@pytest.mark.parametrize("closed_over", [True, False], ids=["closed_over", "argument"])
def test_an_unknown_axis_name_names_it_and_the_bound_axes(closed_over):
    x, _, _, _ = _inputs()
    state = bnjax.batch_norm_state(4)

    def step(x, state=state):
        return bnjax.batch_norm(x, state, training=True, axis_name="devices")

    mesh = jax.make_mesh((DEVICES,), ("batch",))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    if closed_over:
        run = jax.shard_map(step, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P()))
        args = (x,)
    else:
        run = jax.shard_map(
            step, mesh=mesh, in_specs=(P("batch"), P()), out_specs=(P("batch"), P())
        )
        args = (x, state)
    with pytest.raises(ValueError, match=r"`axis_name`='devices' is not bound.*'batch'"):
        run(*args)
