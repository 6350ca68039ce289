"""domain_batch_norm over 8 CPU devices: synchronised statistics equal one device on the
whole batch (also for devices without examples of a domain), and the federated local modes
(FedBN, SiloBN) equal independent per-client batch norms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax

DEVICES, PER_DEVICE, C, D = 8, 3, 4, 3
SHAPE = (DEVICES * PER_DEVICE, 2, C)
# Device 0 holds only domain 0, device 3 only domain 2; domain 1 lives on a few devices.
DOMAIN = jnp.array(
    [0, 0, 0, 2, 0, 1, 0, 2, 2, 2, 2, 2, 1, 0, 0, 0, 1, 2, 0, 2, 0, 1, 1, 0], jnp.int32
)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], SHAPE) * 3.0 + 2.0
    cotangent = jax.random.normal(keys[1], SHAPE)
    scale = jax.random.normal(keys[2], (D, C)) + 1.0
    bias = jax.random.normal(keys[3], (D, C))
    return x, cotangent, scale, bias


def _loss(x, scale, bias, cotangent, domain, **options):
    y, state = bnjax.domain_batch_norm(
        x,
        bnjax.domain_batch_norm_state(D, C),
        scale,
        bias,
        domain=domain,
        training=True,
        **options,
    )
    return jnp.sum(jnp.sin(y) * cotangent), (y, state)


def _step(x, cotangent, domain, scale, bias, **options):
    grads, (y, state) = jax.grad(_loss, (0, 1, 2), has_aux=True)(
        x, scale, bias, cotangent, domain, **options
    )
    return y, state, grads


def _shard_map(step, mesh, state_spec):
    return jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P("batch"), P(), P()),
            out_specs=(P("batch"), state_spec, (P("batch"), P(), P())),
        )
    )


def test_shard_map_sync_equals_one_device_with_absent_domains():
    x, cotangent, scale, bias = _inputs()
    y, state, grads = _step(x, cotangent, DOMAIN, scale, bias)
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    run = _shard_map(lambda *a: _step(*a, axis_name="batch"), mesh, P())
    sharded = NamedSharding(mesh, P("batch"))
    y_s, state_s, grads_s = run(
        *(jax.device_put(a, sharded) for a in (x, cotangent, DOMAIN)), scale, bias
    )
    chex.assert_trees_all_close(y_s, y, atol=1e-5)
    chex.assert_trees_all_close(state_s, state, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads_s, grads, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pmap_axis_index_groups_equal_the_groups_alone():
    x, cotangent, scale, bias = _inputs()
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    split = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])  # noqa: E731
    y_p, state_p, _ = jax.pmap(
        lambda *a: _step(*a, scale, bias, axis_name="batch", axis_index_groups=groups),
        axis_name="batch",
    )(split(x), split(cotangent), split(DOMAIN))
    half = DEVICES * PER_DEVICE // 2
    for g, part in enumerate((slice(0, half), slice(half, None))):
        y, state, _ = _step(x[part], cotangent[part], DOMAIN[part], scale, bias)
        chex.assert_trees_all_close(y_p[4 * g : 4 * g + 4].reshape(y.shape), y, atol=1e-5)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, g=g: a[4 * g], state_p), state, atol=1e-6, rtol=1e-6
        )


def _per_client_batch_norm(x, scale, bias):
    """Each client (device) alone with bnjax.batch_norm and its own affine: FedBN's layer."""
    ys, means, variances = [], [], []
    for client in range(DEVICES):
        part = slice(client * PER_DEVICE, (client + 1) * PER_DEVICE)
        y, state = bnjax.batch_norm(
            x[part],
            bnjax.batch_norm_state(C),
            scale[client],
            bias[client],
            training=True,
            momentum=0.0,
        )
        ys.append(y), means.append(state.mean), variances.append(state.var)
    return jnp.concatenate(ys), jnp.stack(means), jnp.stack(variances)


def test_fedbn_client_domains_synced_or_local_equal_independent_clients():
    """FedBN / SiloBN: statistics never averaged across clients. Two equivalent ways:
    (1) one domain per client with `axis_name` over the client axis: each row gets its
    client's examples only (the others contribute count 0), and the state stays replicated;
    (2) `axis_name=None` in shard_map: every client keeps its own state (out_specs over
    the client axis); (3) under plain jit with a sharded batch, `ghost_batch_size` = the
    per-client batch keeps the statistics local without any collective."""
    x, _, _, _ = _inputs()
    scale = jax.random.normal(jax.random.key(5), (DEVICES, C)) + 1.0
    bias = jax.random.normal(jax.random.key(6), (DEVICES, C))
    client = jnp.repeat(jnp.arange(DEVICES), PER_DEVICE)
    y_ref, mean_ref, var_ref = _per_client_batch_norm(x, scale, bias)
    mesh = jax.make_mesh((DEVICES,), ("clients",))
    sharded = NamedSharding(mesh, P("clients"))
    initial = bnjax.domain_batch_norm_state(DEVICES, C)

    def synced(x, domain):
        return bnjax.domain_batch_norm(
            x,
            initial,
            scale,
            bias,
            domain=domain,
            training=True,
            axis_name="clients",
            momentum=0.0,
        )

    run = jax.jit(
        jax.shard_map(
            synced, mesh=mesh, in_specs=(P("clients"),) * 2, out_specs=(P("clients"), P())
        )
    )
    y, state = run(jax.device_put(x, sharded), jax.device_put(client, sharded))
    chex.assert_trees_all_close(y, y_ref, atol=1e-5)
    chex.assert_trees_all_close((state.mean, state.var), (mean_ref, var_ref), atol=1e-6)
    assert state.count.tolist() == [1] * DEVICES

    def local(x, scale, bias):  # each client: one domain, its own state and affine
        y, s = bnjax.domain_batch_norm(
            x,
            bnjax.domain_batch_norm_state(1, C),
            scale,
            bias,
            domain=0,
            training=True,
            momentum=0.0,
        )
        return y, s.mean, s.var

    run = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P("clients"),) * 3, out_specs=(P("clients"),) * 3)
    )
    y, mean, var = run(*(jax.device_put(a, sharded) for a in (x, scale, bias)))
    chex.assert_trees_all_close((y, mean, var), (y_ref, mean_ref, var_ref), atol=1e-5)

    ghost = jax.jit(
        lambda x, domain: bnjax.domain_batch_norm(
            x,
            initial,
            scale,
            bias,
            domain=domain,
            training=True,
            momentum=0.0,
            ghost_batch_size=PER_DEVICE,
        )
    )
    y, state = ghost(jax.device_put(x, sharded), jax.device_put(client, sharded))
    chex.assert_trees_all_close(y, y_ref, atol=1e-5)
    # One ghost batch per client: each row is its client's statistics.
    np.testing.assert_allclose(state.mean, mean_ref, atol=1e-6)
