"""evonorm_b0 and evonorm_s0 against float64 NumPy transcriptions of the paper's layers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bnjax

NHWC = (4, 3, 3, 8)


def _normal(shape, seed=0, loc=0.0, scale=1.0):
    return (loc + scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _params(channels, seed=1):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, channels)
    bias = rng.normal(size=channels)
    v = rng.uniform(0.2, 1.5, channels)
    return [p.astype(np.float32) for p in (scale, bias, v)]


def _masked_var(x, axes, mask):
    weights = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    count = weights.sum(axes, keepdims=True)
    mean = (weights * x).sum(axes, keepdims=True) / np.maximum(count, 1)
    return (weights * (x - mean) ** 2).sum(axes, keepdims=True) / np.maximum(count, 1)


def b0_reference(x, scale, bias, v, epsilon, *, batch_var=None, mask=None):
    """Liu et al. (2020), EvoNorm-B0 (NHWC): x / max(sqrt(s2_bwh + eps), v x + sqrt(s2_wh +
    eps)) * gamma + beta; s2_bwh the batch variance (or the running one), s2_wh per example.
    Returns (y, batch variance per channel)."""
    x = np.asarray(x, np.float64)
    spatial = tuple(range(1, x.ndim - 1))
    if batch_var is None:
        batch_var = _masked_var(x, (0, *spatial), mask)
    denominator = np.sqrt(np.asarray(batch_var, np.float64) + epsilon)
    if v is not None:
        instance = _masked_var(x, spatial, mask)
        denominator = np.maximum(denominator, np.float64(v) * x + np.sqrt(instance + epsilon))
    y = x / denominator * np.float64(scale) + np.float64(bias)
    return y, np.asarray(batch_var).reshape(-1)


def s0_reference(x, scale, bias, v, epsilon, groups, mask=None):
    """Liu et al. (2020), EvoNorm-S0 (NHWC): x sigmoid(v x) / sqrt(s2_{w,h,c/g} + eps) * gamma
    + beta, the variance per example over space and the channels of each group."""
    x = np.asarray(x, np.float64)
    n, channels = x.shape[0], x.shape[-1]
    grouped = x.reshape(*x.shape[:-1], groups, channels // groups)
    grouped_mask = None
    if mask is not None:
        m = np.broadcast_to(mask, x.shape)
        grouped_mask = m.reshape(grouped.shape)
    axes = (*range(1, x.ndim - 1), x.ndim)
    var = _masked_var(grouped, axes, grouped_mask)
    std = np.broadcast_to(np.sqrt(var + epsilon), grouped.shape).reshape(x.shape)
    numerator = x if v is None else x / (1 + np.exp(-np.float64(v) * x))
    del n
    return numerator / std * np.float64(scale) + np.float64(bias)


# ------------------------------------------------------------------------------ EvoNorm-B0


@pytest.mark.parametrize("with_v", [True, False], ids=["activation", "no_activation"])
def test_b0_training_matches_the_paper_and_updates_the_running_variance(with_v):
    x = _normal(NHWC, loc=0.5, scale=2.0)
    scale, bias, v = _params(8)
    v = v if with_v else None
    with jax.enable_x64(True):
        state = bnjax.evonorm_b0_state(8)
        y, new = bnjax.evonorm_b0(
            jnp.asarray(x, jnp.float64), state, scale, bias, v, training=True, momentum=0.9
        )
        expected, batch_var = b0_reference(x, scale, bias, v, 1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-12)
        np.testing.assert_allclose(new.var, 0.9 + 0.1 * batch_var, rtol=1e-12)
        assert int(new.count) == 1 and int(new.skipped) == 0
    y32, new32 = bnjax.evonorm_b0(x, bnjax.evonorm_b0_state(8), scale, bias, v, training=True)
    np.testing.assert_allclose(y32, expected, atol=3e-6)
    assert new32.var.dtype == jnp.float32


def test_b0_evaluation_uses_the_running_variance_and_returns_the_state():
    x = _normal(NHWC, seed=2)
    scale, bias, v = _params(8)
    running = np.linspace(0.5, 3.0, 8).astype(np.float32)
    state = bnjax.evonorm_b0_state(8)._replace(var=jnp.asarray(running))
    y, same = bnjax.evonorm_b0(x, state, scale, bias, v, training=False)
    assert same is state
    expected, _ = b0_reference(x, scale, bias, v, 1e-5, batch_var=running)
    np.testing.assert_allclose(y, expected, atol=3e-6)


def test_b0_evaluation_equals_training_when_the_state_holds_the_batch_variance():
    x = _normal(NHWC, seed=3, loc=1.0)
    scale, bias, v = _params(8)
    y_train, _ = bnjax.evonorm_b0(x, bnjax.evonorm_b0_state(8), scale, bias, v, training=True)
    batch_var = np.asarray(x, np.float64).var(axis=(0, 1, 2))
    state = bnjax.evonorm_b0_state(8)._replace(var=jnp.asarray(batch_var, jnp.float32))
    y_eval, _ = bnjax.evonorm_b0(x, state, scale, bias, v, training=False)
    chex.assert_trees_all_close(y_eval, y_train, atol=2e-6)


def test_b0_cumulative_average_and_masks():
    xs = [_normal(NHWC, seed=s, loc=s, scale=s + 1.0) for s in (4, 5)]
    mask = np.random.default_rng(6).random((4, 1, 1, 1)) > 0.4
    mask[0] = True
    state = bnjax.evonorm_b0_state(8)
    scale, bias, v = _params(8)
    expected_vars = []
    for x in xs:
        poisoned = np.where(mask, x, np.nan).astype(np.float32)
        y, state = bnjax.evonorm_b0(
            poisoned, state, scale, bias, v, training=True, momentum=None, mask=mask
        )
        expected, batch_var = b0_reference(x, scale, bias, v, 1e-5, mask=mask)
        np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, expected, 0), atol=3e-5)
        expected_vars.append(batch_var)
    np.testing.assert_allclose(state.var, np.mean(expected_vars, axis=0), rtol=1e-5)
    assert int(state.count) == 2


def test_b0_non_finite_batch_never_poisons_the_running_variance():
    x = _normal(NHWC, seed=7)
    x[0, 0, 0, 0] = np.inf
    state = bnjax.evonorm_b0_state(8)
    _, new = bnjax.evonorm_b0(x, state, training=True)
    chex.assert_trees_all_equal(new.var, state.var)
    assert (int(new.count), int(new.skipped)) == (0, 1)
    # Incoming running variances that are not finite: eager calls name the field ...
    bad = state._replace(var=state.var.at[2].set(jnp.nan))
    with pytest.raises(ValueError, match=r"`state\.var`.*evonorm_b0_state"):
        bnjax.evonorm_b0(_normal(NHWC), bad, training=True)
    # ... traced ones leave the state as it is, neither counted nor skipped.
    with pytest.warns(RuntimeWarning, match=r"`state\.var`"):
        _, traced = jax.jit(lambda x, s: bnjax.evonorm_b0(x, s, training=True))(_normal(NHWC), bad)
        jax.block_until_ready(traced)
    chex.assert_trees_all_equal(traced.var, bad.var)
    assert (int(traced.count), int(traced.skipped)) == (0, 0)
    with pytest.raises(ValueError, match=r"`state\.var` is negative"):
        bnjax.evonorm_b0(_normal(NHWC), state._replace(var=-state.var), training=False)


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_b0_gradients_in_float64(order):
    x = _normal((3, 2, 2, 4), seed=8, loc=0.2)
    scale, bias, v = _params(4)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, v)]
        state = bnjax.evonorm_b0_state(4)

        def train(x, scale, bias, v):
            return bnjax.evonorm_b0(x, state, scale, bias, v, training=True, epsilon=1e-3)[0]

        def evaluate(x, scale, bias, v):
            return bnjax.evonorm_b0(x, state, scale, bias, v, training=False, epsilon=1e-3)[0]

        check_grads(jax.jit(train), args, order=order, modes=("fwd", "rev"))
        check_grads(jax.jit(evaluate), args, order=order, modes=("fwd", "rev"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_b0_low_precision_input_has_float32_statistics(dtype):
    x = _normal(NHWC, seed=9, loc=300.0, scale=200.0)  # squares overflow float16
    scale, bias, v = _params(8)
    low = jnp.asarray(x, dtype)
    y, state = bnjax.evonorm_b0(low, bnjax.evonorm_b0_state(8), scale, bias, v, training=True)
    assert y.dtype == dtype and state.var.dtype == jnp.float32
    expected, batch_var = b0_reference(np.asarray(low, np.float64), scale, bias, v, 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(state.var, 0.99 + 0.01 * batch_var, rtol=1e-5)


def test_variances_stay_exact_when_the_mean_is_a_thousand_stds():
    """E[x^2] - E[x]^2 in float32 keeps about one digit here; two-pass moments keep ~all."""
    x = _normal(NHWC, seed=20, loc=1000.0, scale=1.0)
    scale, bias, v = _params(8)
    y, state = bnjax.evonorm_b0(
        x, bnjax.evonorm_b0_state(8), scale, bias, v, training=True, momentum=0.0
    )
    expected, batch_var = b0_reference(x, scale, bias, v, 1e-5)
    np.testing.assert_allclose(state.var, batch_var, rtol=1e-4)
    np.testing.assert_allclose(y, expected, rtol=1e-4)
    s0 = bnjax.evonorm_s0(x, scale, bias, v, num_groups=4)
    np.testing.assert_allclose(s0, s0_reference(x, scale, bias, v, 1e-5, 4), rtol=1e-4)


DEVICES = 8


def _b0_loss(x, scale, bias, v, cotangent, mask=None, **options):
    y, state = bnjax.evonorm_b0(
        x, bnjax.evonorm_b0_state(8), scale, bias, v, training=True, mask=mask, **options
    )
    return jnp.sum(jnp.sin(y) * cotangent), (y, state)


def test_b0_shard_map_over_8_devices_equals_one_device_with_the_whole_batch():
    """Ragged masks: devices hold different numbers of valid examples."""
    x = _normal((DEVICES * 3, 2, 2, 8), seed=10, loc=2.0, scale=3.0)
    cotangent = _normal(x.shape, seed=11)
    mask = np.random.default_rng(12).random((x.shape[0], 1, 1, 1)) > 0.35
    mask[::3] = True
    scale, bias, v = _params(8)
    grad = jax.grad(_b0_loss, (0, 1, 2, 3), has_aux=True)
    grads, (y, state) = grad(x, scale, bias, v, cotangent, mask)

    mesh = jax.make_mesh((DEVICES,), ("batch",))

    def step(x, cotangent, mask, scale, bias, v):
        return grad(x, scale, bias, v, cotangent, mask, axis_name="batch")

    run = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P("batch"), P(), P(), P()),
            out_specs=((P("batch"), P(), P(), P()), (P("batch"), P())),
        )
    )
    sharded = NamedSharding(mesh, P("batch"))
    grads_s, (y_s, state_s) = run(
        *(jax.device_put(a, sharded) for a in (x, cotangent, mask)), scale, bias, v
    )
    chex.assert_trees_all_close(y_s, y, atol=1e-5)
    chex.assert_trees_all_close(state_s, state, rtol=1e-6)
    chex.assert_trees_all_close(grads_s, grads, atol=1e-4, rtol=1e-5)


def test_b0_axis_index_groups_share_the_variance_within_each_group():
    x = _normal((DEVICES * 2, 2, 2, 8), seed=13, loc=-1.0, scale=2.0)
    scale, bias, v = _params(8)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def step(x):
        return bnjax.evonorm_b0(
            x,
            bnjax.evonorm_b0_state(8),
            scale,
            bias,
            v,
            training=True,
            axis_name="batch",
            axis_index_groups=groups,
        )

    y, state = jax.pmap(step, axis_name="batch")(x.reshape(DEVICES, 2, *x.shape[1:]))
    for group, devices in enumerate(groups):
        rows = x[group * 8 : (group + 1) * 8]
        y_h, state_h = bnjax.evonorm_b0(
            rows, bnjax.evonorm_b0_state(8), scale, bias, v, training=True
        )
        chex.assert_trees_all_close(
            y[devices[0] : devices[-1] + 1].reshape(rows.shape), y_h, atol=1e-5
        )
        np.testing.assert_allclose(state.var[devices[0]], state_h.var, rtol=1e-6)


def test_b0_bad_inputs_are_refused_naming_the_argument():
    x = _normal(NHWC)
    state = bnjax.evonorm_b0_state(8)
    with pytest.raises(ValueError, match="single value"):
        bnjax.evonorm_b0(x[:1, :1, :1], state, training=True)
    with pytest.raises(ValueError, match=r"`state\.var` has shape"):
        bnjax.evonorm_b0(x, bnjax.evonorm_b0_state(4), training=True)
    with pytest.raises(TypeError, match="EvoNormB0State"):
        bnjax.evonorm_b0(x, bnjax.batch_norm_state(8), training=True)
    with pytest.raises(ValueError, match="`v` has shape"):
        bnjax.evonorm_b0(x, state, v=jnp.ones(3), training=True)
    with pytest.raises(ValueError, match="`momentum`"):
        bnjax.evonorm_b0(x, state, training=True, momentum=1.5)
    with pytest.raises(TypeError, match="training must be True or False"):
        bnjax.evonorm_b0(x, state, training="False")
    with pytest.raises(ValueError, match="axis_index_groups"):
        bnjax.evonorm_b0(x, state, training=True, axis_index_groups=[[0]])


# ------------------------------------------------------------------------------ EvoNorm-S0


@pytest.mark.parametrize("with_v", [True, False], ids=["activation", "no_activation"])
def test_s0_matches_the_paper_in_float64(with_v):
    x = _normal(NHWC, seed=14, loc=0.5, scale=2.0)
    scale, bias, v = _params(8)
    v = v if with_v else None
    with jax.enable_x64(True):
        y = bnjax.evonorm_s0(jnp.asarray(x, jnp.float64), scale, bias, v, num_groups=4)
        np.testing.assert_allclose(y, s0_reference(x, scale, bias, v, 1e-5, 4), rtol=1e-12)
    y32 = bnjax.evonorm_s0(x, scale, bias, v, num_groups=None, group_size=2)
    np.testing.assert_allclose(y32, s0_reference(x, scale, bias, v, 1e-5, 4), atol=3e-6)


def test_s0_is_batch_independent_and_takes_masks():
    x = _normal(NHWC, seed=15)
    scale, bias, v = _params(8)
    others = _normal(NHWC, seed=16, loc=4.0, scale=9.0)
    a = bnjax.evonorm_s0(x, scale, bias, v, num_groups=2)
    b = bnjax.evonorm_s0(np.concatenate([x[:1], others[1:]]), scale, bias, v, num_groups=2)
    chex.assert_trees_all_equal(a[0], b[0])
    mask = np.random.default_rng(17).random(NHWC[:3] + (1,)) > 0.3
    mask[:, 0, 0] = True
    y = bnjax.evonorm_s0(np.where(mask, x, np.nan), scale, bias, v, num_groups=2, mask=mask)
    expected = s0_reference(x, scale, bias, v, 1e-5, 2, mask=mask)
    np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, expected, 0), atol=3e-6)


@pytest.mark.parametrize("order", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_s0_gradients_in_float64(order):
    x = _normal((2, 2, 2, 4), seed=18, loc=0.2)
    scale, bias, v = _params(4)
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, scale, bias, v)]
        check_grads(
            jax.jit(lambda *a: bnjax.evonorm_s0(*a, num_groups=2)),
            args,
            order=order,
            modes=("fwd", "rev"),
        )


def test_s0_low_precision_and_split_examples():
    x = _normal((2, 8, 3, 8), seed=19, loc=200.0, scale=100.0)
    scale, bias, v = _params(8)
    low = jnp.asarray(x, jnp.float16)
    y = bnjax.evonorm_s0(low, scale, bias, v, num_groups=4)
    assert y.dtype == jnp.float16
    expected = s0_reference(np.asarray(low, np.float64), scale, bias, v, 1e-5, 4)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-2, atol=2e-2)
    # Devices holding rows of each image merge the group moments exactly.
    whole = bnjax.evonorm_s0(x, scale, bias, v, num_groups=4)
    parts = jnp.moveaxis(jnp.asarray(x).reshape(2, 4, 2, 3, 8), 1, 0)
    mapped = jax.vmap(
        lambda p: bnjax.evonorm_s0(p, scale, bias, v, num_groups=4, axis_name="rows"),
        axis_name="rows",
    )(parts)
    chex.assert_trees_all_close(jnp.moveaxis(mapped, 0, 1).reshape(x.shape), whole, atol=1e-5)


def test_s0_bad_inputs_are_refused_naming_the_argument():
    x = _normal(NHWC)
    with pytest.raises(ValueError, match="`num_groups`=3 must divide the 8 channels"):
        bnjax.evonorm_s0(x, num_groups=3)
    with pytest.raises(ValueError, match="`group_size`=3 must divide"):
        bnjax.evonorm_s0(x, num_groups=None, group_size=3)
    with pytest.raises(ValueError, match="exactly one of"):
        bnjax.evonorm_s0(x, num_groups=2, group_size=4)
    with pytest.raises(ValueError, match="`scale` has shape"):
        bnjax.evonorm_s0(x, jnp.ones(4), num_groups=2)
    with pytest.raises(TypeError, match="`v` is complex"):
        bnjax.evonorm_s0(x, v=jnp.ones(8, jnp.complex64), num_groups=2)
