"""Cross-iteration batch norm against a float64 NumPy reference of the paper's formulas.

The reference works in the paper's own terms (Yao et al. 2021): per past step the mean mu, the
raw second moment nu = E[y^2] and their kernel derivatives E[p] and 2 E[y p] from explicit
input patches p; Taylor compensation to the current kernel; nu_bar = mean(max(nu, mu^2)),
var_bar = nu_bar - mu_bar^2. The implementation keeps variances instead (stable algebra of the
same numbers), so agreement checks that algebra as well.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bnjax
from bnjax.core.cross_iteration_batch_norm import (
    cross_iteration_batch_norm,
    cross_iteration_state,
    dense,
)

EPS = 1e-5


def conv3x3(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def patches(x):
    """(N, H, W, 3, 3, C_in) input patches of a 3x3 SAME stride-1 conv, in NumPy."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, 3, 3, c))
    for i in range(3):
        for j in range(3):
            out[:, :, :, i, j, :] = padded[:, i : i + h, j : j + w, :]
    return out


def paper_statistics(x, kernel):
    """mu, nu and their kernel derivatives (the paper's efficient form), float64."""
    p = patches(np.asarray(x, np.float64))
    y = np.einsum("nhwabi,abio->nhwo", p, kernel)
    m = y.shape[0] * y.shape[1] * y.shape[2]
    mu, nu = y.mean((0, 1, 2)), (y**2).mean((0, 1, 2))
    d_mu = np.broadcast_to(p.mean((0, 1, 2))[..., None], kernel.shape)
    d_nu = 2 * np.einsum("nhwabi,nhwo->abio", p, y) / m
    return y, dict(mu=mu, nu=nu, d_mu=d_mu, d_nu=d_nu, kernel=kernel)


def paper_step(x, kernel, past, step, burn_in, scale, bias):
    """One training step of the reference: (out, pooled mean, pooled variance, this step)."""
    y, current = paper_statistics(x, kernel)
    terms = [(current["mu"], current["nu"])]
    if step >= burn_in:
        for old in past:
            delta = kernel - old["kernel"]
            mu = old["mu"] + np.sum(old["d_mu"] * delta, axis=(0, 1, 2))
            nu = old["nu"] + np.sum(old["d_nu"] * delta, axis=(0, 1, 2))
            terms.append((mu, nu))
    mu_bar = np.mean([mu for mu, _ in terms], axis=0)
    nu_bar = np.mean([np.maximum(nu, mu**2) for mu, nu in terms], axis=0)
    var_bar = nu_bar - mu_bar**2
    out = scale * (y - mu_bar) / np.sqrt(var_bar + EPS) + bias
    return out, mu_bar, var_bar, current


def _data(steps, key=0, shape=(3, 5, 5, 2), channels=3, drift=0.05):
    keys = jax.random.split(jax.random.key(key), 2 * steps + 1)
    kernel = np.asarray(jax.random.normal(keys[0], (3, 3, shape[-1], channels)), np.float64)
    xs, kernels = [], []
    for t in range(steps):
        xs.append(np.asarray(jax.random.normal(keys[2 * t + 1], shape), np.float64) + 0.5)
        kernels.append(kernel)
        kernel = kernel + drift * np.asarray(jax.random.normal(keys[2 * t + 2], kernel.shape))
    return xs, kernels


def test_matches_the_paper_formulas_step_by_step_in_float64():
    window, burn_in, momentum = 3, 2, 0.9
    xs, kernels = _data(6)
    scale, bias = np.array([1.0, 2.0, 0.5]), np.array([0.1, -0.2, 0.3])
    with jax.enable_x64(True):
        state = cross_iteration_state(kernels[0].shape, window=window)
        past, running_mean, running_var = [], np.zeros(3), np.ones(3)
        for t, (x, kernel) in enumerate(zip(xs, kernels, strict=True)):
            out, state = cross_iteration_batch_norm(
                jnp.asarray(x), jnp.asarray(kernel), state, jnp.asarray(scale),
                jnp.asarray(bias), conv=conv3x3, training=True, burn_in=burn_in,
                momentum=momentum, epsilon=EPS,
            )  # fmt: skip
            want, mu_bar, var_bar, current = paper_step(x, kernel, past, t, burn_in, scale, bias)
            np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
            running_mean = momentum * running_mean + (1 - momentum) * mu_bar
            running_var = momentum * running_var + (1 - momentum) * var_bar
            np.testing.assert_allclose(state.mean, running_mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(state.var, running_var, rtol=1e-10, atol=1e-12)
            past = [current, *past][: window - 1]
            # The state's slot 0 is this step, kept as (mean, variance) and their derivatives.
            np.testing.assert_allclose(state.past_mean[0], current["mu"], rtol=1e-10)
            np.testing.assert_allclose(
                state.past_var[0], current["nu"] - current["mu"] ** 2, rtol=1e-9
            )
            np.testing.assert_allclose(state.past_mean_grad[0], current["d_mu"], atol=1e-12)
            np.testing.assert_allclose(
                state.past_var_grad[0],
                current["d_nu"] - 2 * current["mu"] * current["d_mu"],
                rtol=1e-9,
                atol=1e-12,
            )
            np.testing.assert_allclose(
                state.past_mean_offset[0],
                np.sum(current["d_mu"] * kernel, axis=(0, 1, 2)),
                rtol=1e-10,
            )
            assert int(state.step) == t + 1


def test_pooling_changes_the_output_after_burn_in_only():
    xs, kernels = _data(4, drift=0.3)
    with jax.enable_x64(True):
        state = cross_iteration_state(kernels[0].shape, window=3)
        for t, (x, kernel) in enumerate(zip(xs, kernels, strict=True)):
            out, state = cross_iteration_batch_norm(
                x, kernel, state, conv=conv3x3, training=True, burn_in=2, epsilon=EPS
            )
            y = conv3x3(x, kernel)
            plain = (y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + EPS)
            # Burn-in (steps 0, 1) is plain batch norm; pooling from step 2 on differs.
            assert bool(jnp.allclose(out, plain, atol=1e-10)) == (t < 2), t
        assert int(state.step) == 4


def test_the_compensated_mean_is_the_past_batch_mean_under_the_current_kernel():
    """The mean is linear in the kernel: its Taylor term is exact for any kernel change. The
    second moment's is first order: its error falls as the square of the change."""
    xs, kernels = _data(1)
    x, old = xs[0], kernels[0]
    direction = np.asarray(jax.random.normal(jax.random.key(7), old.shape))
    with jax.enable_x64(True):
        state = cross_iteration_state(old.shape, window=2)
        _, state = cross_iteration_batch_norm(x, old, state, conv=conv3x3, training=True)
        errors = []
        for size in (0.2, 0.1, 0.05):
            new = old + size * direction
            y = np.asarray(conv3x3(x, new))
            delta = new - old
            # The state's Taylor term: <grad, new> - offset, with offset = <grad, old>.
            shift = np.sum(state.past_mean_grad[0] * new, axis=(0, 1, 2))
            mean = state.past_mean[0] + shift - state.past_mean_offset[0]
            np.testing.assert_allclose(mean, y.mean((0, 1, 2)), rtol=1e-12, atol=1e-12)
            _, reference = paper_statistics(x, old)
            nu = reference["nu"] + np.sum(reference["d_nu"] * delta, axis=(0, 1, 2))
            errors.append(np.max(np.abs(nu - (y**2).mean((0, 1, 2)))))
        assert 3.9 < errors[0] / errors[1] < 4.1 and 3.9 < errors[1] / errors[2] < 4.1


def test_window_one_is_batch_norm():
    xs, kernels = _data(3)
    state = cross_iteration_state(kernels[0].shape, window=1)
    bn_state = bnjax.batch_norm_state(3)
    for x, kernel in zip(xs, kernels, strict=True):
        x, kernel = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
        out, state = cross_iteration_batch_norm(
            x, kernel, state, conv=conv3x3, training=True, burn_in=0, momentum=0.8
        )
        want, bn_state = bnjax.batch_norm(conv3x3(x, kernel), bn_state, training=True, momentum=0.8)
        chex.assert_trees_all_close(out, want, atol=2e-6)
        chex.assert_trees_all_close((state.mean, state.var), (bn_state.mean, bn_state.var))
    # Evaluation is batch norm's evaluation with the running statistics.
    out, same = cross_iteration_batch_norm(x, kernel, state, conv=conv3x3, training=False)
    want, _ = bnjax.batch_norm(conv3x3(x, kernel), bn_state, training=False)
    chex.assert_trees_all_close(out, want, atol=2e-6)
    assert same is state


GRAD_SHAPE = (2, 3, 3, 2)


def _filled_state(window=3, dtype=jnp.float64):
    xs, kernels = _data(window + 1, shape=GRAD_SHAPE)
    state = cross_iteration_state(kernels[0].shape, window=window, dtype=dtype)
    for x, kernel in zip(xs[:-1], kernels[:-1], strict=True):
        _, state = cross_iteration_batch_norm(x, kernel, state, conv=conv3x3, training=True)
    return xs[-1], kernels[-1], state


def test_gradients_in_float64():
    with jax.enable_x64(True):
        x, kernel, state = _filled_state()
        scale, bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3])
        weights = jnp.sin(jnp.arange(x.size // 2 * 3).reshape(x.shape[:-1] + (3,)))

        def loss(x, kernel, scale, bias, state=state):
            out, _ = cross_iteration_batch_norm(
                x, kernel, state, scale, bias, conv=conv3x3, training=True
            )
            return jnp.sum(jnp.tanh(out) * weights)

        # The past statistics do not depend on x, scale or bias: the full derivative.
        check_grads(lambda x, s, b: loss(x, kernel, s, b), (x, scale, bias), order=1)
        # During burn-in the layer is batch norm of conv(x, kernel): all arguments.
        fresh = cross_iteration_state(kernel.shape, window=3)
        check_grads(functools.partial(loss, state=fresh), (x, kernel, scale, bias), order=1)

        # After burn-in the compensated past statistics are constants: the kernel gradient is
        # that of the paper's formula with those constants (computed in NumPy, fed back in).
        past = []
        for t in range(3):
            old_x, old_kernel = (a[t] for a in _data(4, shape=GRAD_SHAPE))
            past.insert(0, paper_statistics(old_x, old_kernel)[1])
        constants = []
        for old in past[:2]:
            delta = np.asarray(kernel) - old["kernel"]
            mu = old["mu"] + np.sum(old["d_mu"] * delta, axis=(0, 1, 2))
            nu = old["nu"] + np.sum(old["d_nu"] * delta, axis=(0, 1, 2))
            constants.append((mu, np.maximum(nu, mu**2)))

        def paper_loss(kernel):
            y = conv3x3(x, kernel)
            mu = jnp.mean(y, (0, 1, 2))
            nu = jnp.mean(y**2, (0, 1, 2))
            mu_bar = (mu + sum(m for m, _ in constants)) / 3
            nu_bar = (nu + sum(n for _, n in constants)) / 3
            out = scale * (y - mu_bar) / jnp.sqrt(nu_bar - mu_bar**2 + EPS) + bias
            return jnp.sum(jnp.tanh(out) * weights)

        chex.assert_trees_all_close(
            jax.grad(loss, 1)(x, kernel, scale, bias), jax.grad(paper_loss)(kernel), rtol=1e-9
        )


DEVICES = 8


def _sharded_step(mask, cotangent, **options):
    """jit(shard_map) of one step on 8 devices: (x, kernel, state, scale) -> output, new state
    and gradients."""

    def local(x, mask, cotangent, kernel, state, scale):
        def loss(x, kernel, scale):
            out, new_state = cross_iteration_batch_norm(
                x, kernel, state, scale, conv=conv3x3, training=True, mask=mask,
                axis_name="batch", **options,
            )  # fmt: skip
            return jnp.sum(out * cotangent), (out, new_state)

        grads, (out, new_state) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, kernel, scale)
        return out, new_state, grads

    mesh = jax.make_mesh((DEVICES,), ("batch",))
    batch = P("batch")
    run = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(batch, batch, batch, P(), P(), P()),
            out_specs=(batch, P(), (batch, P(), P())),
        )
    )  # fmt: skip
    sharded = jax.sharding.NamedSharding(mesh, batch)
    mask, cotangent = (jax.device_put(a, sharded) for a in (mask, cotangent))
    return lambda x, kernel, state, scale: run(
        jax.device_put(x, sharded), mask, cotangent, kernel, state, scale
    )


def test_sync_over_8_devices_equals_one_device_with_the_whole_batch():
    xs, kernels = _data(4, shape=(2 * DEVICES, 4, 4, 2))
    xs, kernels = (
        [jnp.asarray(a, jnp.float32) for a in xs],
        [jnp.asarray(k, jnp.float32) for k in kernels],
    )
    # Ragged: device 1 has no valid example, device 2 one, the others two.
    mask = np.ones(2 * DEVICES, bool)
    mask[[2, 3, 5]] = False
    mask = jnp.asarray(mask).reshape(-1, 1, 1, 1)
    scale = jnp.array([1.0, 2.0, 0.5])
    cotangent = jax.random.normal(jax.random.key(3), (2 * DEVICES, 4, 4, 3))
    one = many = cross_iteration_state(kernels[0].shape, window=3)
    sharded_step = _sharded_step(mask, cotangent, burn_in=1)

    @jax.jit
    def one_device_step(x, kernel, scale, state):
        def loss(x, kernel, scale):
            out, new_state = cross_iteration_batch_norm(
                x, kernel, state, scale, conv=conv3x3, training=True, mask=mask, burn_in=1
            )
            return jnp.sum(out * cotangent), (out, new_state)

        grads, (out, new_state) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, kernel, scale)
        return out, new_state, grads

    for x, kernel in zip(xs, kernels, strict=True):
        out, one, grads = one_device_step(x, kernel, scale, one)
        out_8, many, grads_8 = sharded_step(x, kernel, many, scale)
        chex.assert_trees_all_close(out_8, out, atol=2e-5)
        chex.assert_trees_all_close(many, one, atol=2e-5, rtol=2e-5)
        chex.assert_trees_all_close(grads_8, grads, atol=2e-4, rtol=2e-4)
    assert int(one.step) == 4


def test_bfloat16_input_keeps_float32_statistics():
    xs, kernels = _data(3)
    state32 = state16 = cross_iteration_state(kernels[0].shape, window=2)
    for x, kernel in zip(xs, kernels, strict=True):
        x, kernel = jnp.asarray(x, jnp.float32) * 100.0, jnp.asarray(kernel, jnp.float32)
        out32, state32 = cross_iteration_batch_norm(x, kernel, state32, conv=conv3x3, training=True)
        out16, state16 = cross_iteration_batch_norm(
            x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), state16, conv=conv3x3,
            training=True,
        )  # fmt: skip
        assert out16.dtype == jnp.bfloat16
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in state16)
    chex.assert_trees_all_close(out16.astype(jnp.float32), out32, atol=0.05)
    chex.assert_trees_all_close(state16.var, state32.var, rtol=0.02)
    chex.assert_trees_all_close(state16.past_var_grad, state32.past_var_grad, rtol=0.05, atol=0.5)


def test_a_non_finite_batch_stays_out_of_the_window_and_the_running_statistics():
    kernel = jnp.ones((2, 3))
    state = cross_iteration_state(kernel.shape, window=2)
    x = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    _, state = jax.jit(
        lambda x, s: cross_iteration_batch_norm(x, kernel, s, training=True, burn_in=0)
    )(x, state)
    bad = x.at[0, 0].set(jnp.nan)
    _, after = cross_iteration_batch_norm(bad, kernel, state, training=True)
    chex.assert_trees_all_close(after._replace(skipped=0), state._replace(skipped=0))
    assert int(after.skipped) == 1 and int(after.step) == 1


def test_dense_kernels_work_as_well():
    kernel = jax.random.normal(jax.random.key(0), (4, 3))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    state = cross_iteration_state(kernel.shape, window=2)
    _, state = cross_iteration_batch_norm(x, kernel, state, conv=dense, training=True)
    out, _ = cross_iteration_batch_norm(x, kernel, state, training=True)
    # The same batch under the same kernel twice: the pooled statistics are the batch's.
    want = (x @ kernel - (x @ kernel).mean(0)) / jnp.sqrt((x @ kernel).var(0) + EPS)
    chex.assert_trees_all_close(out, want, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (dict(kernel=jnp.ones(3)), ValueError, "`kernel` must have a fan-in"),
        (dict(x=jnp.ones((4, 2), jnp.int32)), TypeError, "`inputs` must have a floating"),
        (dict(state=cross_iteration_state((2, 4))), ValueError, "`state.past_mean` has shape"),
        (dict(state=bnjax.batch_norm_state(3)), TypeError, "must be a CrossIterationState"),
        (dict(burn_in=-1), ValueError, "`burn_in` must be >= 0"),
        (dict(scale=jnp.ones(4)), ValueError, "`scale` has shape"),
        (dict(x=jnp.ones((1, 2))), ValueError, "single value"),
        (dict(conv=lambda x, k: (x @ k).T), ValueError, "`conv` must return channels last"),
        (dict(momentum=1.5), ValueError, "`momentum`"),
        (dict(training="yes"), TypeError, "training must be True or False"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, pattern):
    arguments = dict(
        x=jnp.ones((4, 2)), kernel=jnp.ones((2, 3)), state=cross_iteration_state((2, 3)),
        scale=None, burn_in=None, conv=dense, momentum=0.9, training=True,
    )  # fmt: skip
    arguments |= change
    x, kernel, state = (arguments.pop(k) for k in ("x", "kernel", "state"))
    with pytest.raises(error, match=pattern):
        cross_iteration_batch_norm(x, kernel, state, **arguments)


def test_window_and_kernel_shape_checks():
    with pytest.raises(ValueError, match="`window` must be >= 1"):
        cross_iteration_state((2, 3), window=0)
    with pytest.raises(ValueError, match="`kernel_shape` must have"):
        cross_iteration_state((3,))


def test_pmap_with_axis_index_groups_equals_each_group_on_one_device():
    xs, kernels = _data(2, shape=(2 * DEVICES, 3, 3, 2))
    kernel = jnp.asarray(kernels[0], jnp.float32)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def step(x, state):
        return cross_iteration_batch_norm(
            x, kernel, state, conv=conv3x3, training=True, burn_in=0, axis_name="batch",
            axis_index_groups=groups,
        )  # fmt: skip

    run = jax.pmap(step, axis_name="batch")
    fresh = cross_iteration_state(kernel.shape, window=2)
    states = jax.tree.map(lambda a: jnp.stack([a] * DEVICES), fresh)
    references = [fresh, fresh]  # one per group: its 8 examples on one device
    for x in xs:
        x = jnp.asarray(x, jnp.float32)
        out, states = run(x.reshape(DEVICES, 2, *x.shape[1:]), states)
        for g in range(2):
            want, references[g] = cross_iteration_batch_norm(
                x[8 * g : 8 * g + 8], kernel, references[g], conv=conv3x3, training=True,
                burn_in=0,
            )  # fmt: skip
            chex.assert_trees_all_close(out[4 * g : 4 * g + 4].reshape(want.shape), want, atol=2e-5)
            for device in groups[g]:
                got = jax.tree.map(lambda a, d=device: a[d], states)
                chex.assert_trees_all_close(got, references[g], atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_second_order_gradients_in_float64():
    with jax.enable_x64(True):
        x, kernel, state = _filled_state()
        scale, bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3])

        def loss(x, scale, bias):
            out, _ = cross_iteration_batch_norm(
                x, kernel, state, scale, bias, conv=conv3x3, training=True
            )
            return jnp.sum(jnp.tanh(out) * jnp.cos(out))

        check_grads(loss, (x, scale, bias), order=2)


def test_a_device_varying_kernel_still_gives_one_replicated_state():
    """A data-parallel step casts its parameters to device-varying for autodiff; the window
    (kernel-sized derivatives and per-channel Taylor terms) must still come back replicated."""
    xs, kernels = _data(3, shape=(DEVICES, 3, 3, 2))
    mesh = jax.make_mesh((DEVICES,), ("batch",))

    def local(x, kernel, state):
        kernel = lax.pcast(kernel, "batch", to="varying")
        return cross_iteration_batch_norm(
            x, kernel, state, conv=conv3x3, training=True, burn_in=0, axis_name="batch"
        )

    run = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), P())
        )
    )
    state = one = cross_iteration_state(kernels[0].shape, window=3)
    for x, kernel in zip(xs, kernels, strict=True):
        x, kernel = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("batch")))
        out, state = run(sharded, kernel, state)
        want, one = cross_iteration_batch_norm(
            x, kernel, one, conv=conv3x3, training=True, burn_in=0
        )
        chex.assert_trees_all_close(out, want, atol=2e-5)
        chex.assert_trees_all_close(state, one, atol=2e-5, rtol=2e-5)


def test_vmap_with_an_axis_name_equals_the_whole_batch():
    kernel = jax.random.normal(jax.random.key(0), (3, 4))
    x = jax.random.normal(jax.random.key(1), (4, 5, 3))
    state = cross_iteration_state(kernel.shape, window=2)

    def step(x, state):
        return cross_iteration_batch_norm(x, kernel, state, training=True, burn_in=0, axis_name="b")

    run = jax.vmap(step, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    whole = state
    for scale in (1.0, 1.5):
        out, state = run(x * scale, state)
        want, whole = cross_iteration_batch_norm(
            x.reshape(20, 3) * scale, kernel, whole, training=True, burn_in=0
        )
        chex.assert_trees_all_close(out.reshape(20, 4), want, atol=1e-5)
        chex.assert_trees_all_close(state, whole, atol=1e-5, rtol=1e-5)
