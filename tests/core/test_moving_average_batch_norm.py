"""Moving average batch norm against a float64 NumPy transcription of the paper's Algorithm 1.

The reference below keeps plain Python lists of the past batch statistics (no ring buffer) and
writes the forward and the backward formulas out, so the custom gradient (deliberately not the
derivative of the forward) is checked against the paper's formula, not against autodiff.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import bnjax
from bnjax.core.moving_average_batch_norm import (
    MovingAverageBatchNormState,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
)

EPS = 1e-5


class Reference:
    """MABN over a sequence of steps in float64 (x of shape (N, C), statistics over N)."""

    def __init__(self, channels, *, window, momentum, centered, r_max, d_max, warmup):
        self.window, self.momentum, self.centered = window, momentum, centered
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self.mean, self.var = np.zeros(channels), np.ones(channels)
        self.forward = []  # [(mu_B, sigma2_B)] of past steps, oldest first
        self.backward = []  # [(g_B, psi_B)] of past steps
        self.steps = 0

    def _average(self, current, past):
        recent = past[max(len(past) - (self.window - 1), 0) :] if self.window > 1 else []
        return (current + sum(recent)) / (1 + len(recent))

    def step(self, x, dy, scale, bias, mask=None):
        """One training step: (y, dx, dscale, dbias); updates the statistics."""
        x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
        m = np.ones(x.shape[0], bool) if mask is None else np.asarray(mask)
        valid = x[m]
        if self.centered:
            mu_b, var_b = valid.mean(0), valid.var(0)
        else:
            mu_b, var_b = np.zeros(x.shape[1]), (valid**2).mean(0)
        mu = self._average(mu_b, [f[0] for f in self.forward])
        var = self._average(var_b, [f[1] for f in self.forward])
        sigma = np.sqrt(var + EPS)
        running_sigma = np.sqrt(self.var + EPS)
        r, d = np.ones_like(var), np.zeros_like(var)
        if self.steps >= self.warmup:
            r = np.clip(sigma / running_sigma, 1 / self.r_max, self.r_max)
            if self.centered:
                d = np.clip((mu - self.mean) / running_sigma, -self.d_max, self.d_max)
        x_hat = (x - mu) / sigma
        y = scale * (r * x_hat + d) + bias
        # Backward (Algorithm 1): dL/dx_hat = r * scale * dy; the statistics of valid values.
        grad = r * scale * dy
        g_b = grad[m].mean(0) if self.centered else np.zeros(x.shape[1])
        psi_b = (grad[m] * x_hat[m]).mean(0)
        g_bar = self._average(g_b, [b[0] for b in self.backward])
        psi_bar = self._average(psi_b, [b[1] for b in self.backward])
        dx = (grad - m[:, None] * (g_bar + x_hat * psi_bar)) / sigma
        dscale = np.sum(dy * (r * x_hat + d), 0)
        dbias = np.sum(dy, 0)
        # State: the EMAS follow the SMAS; the histories take the batch statistics.
        self.mean = self.momentum * self.mean + (1 - self.momentum) * mu
        self.var = self.momentum * self.var + (1 - self.momentum) * var
        self.forward.append((mu_b, var_b))
        self.backward.append((g_b, psi_b))
        self.steps += 1
        return y, dx, dscale, dbias, (g_b, psi_b)


def _step(x, dy, scale, bias, state, mask=None, **options):
    """One bnjax training step: (y, (dx, dscale, dbias), probe_grad, state after both updates)."""
    probe = moving_average_batch_norm_probe(state)

    def loss(x, scale, bias, probe):
        y, new_state = moving_average_batch_norm(
            x, state, scale, bias, probe, training=True, mask=mask, **options
        )
        return jnp.sum(y * dy), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        x, scale, bias, probe
    )
    new_state = moving_average_batch_norm_backward_update(new_state, grads[3])
    return y, grads[:3], grads[3], new_state


def _batches(steps, n=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.normal(0.5, 2.0, (steps, n, c)) * rng.uniform(0.5, 2.0, (steps, 1, c))
    dys = rng.normal(size=(steps, n, c))
    return xs, dys


CASES = [
    dict(window=4, momentum=0.9, centered=False, r_max=5.0, d_max=5.0, warmup=2),
    dict(window=3, momentum=0.8, centered=True, r_max=1.5, d_max=0.5, warmup=1),
    dict(window=1, momentum=0.9, centered=False, r_max=1.0, d_max=0.0, warmup=0),
    dict(window=2, momentum=0.5, centered=True, r_max=1.0, d_max=0.0, warmup=0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference_over_steps(case, masked):
    steps = 7
    xs, dys = _batches(steps)
    mask = np.array([True, True, False, True, True, False]) if masked else None
    rng = np.random.default_rng(1)
    scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    options = dict(
        momentum=case["momentum"],
        epsilon=EPS,
        centered=case["centered"],
        r_max=case["r_max"],
        d_max=case["d_max"],
        renorm_warmup_steps=case["warmup"],
    )
    reference = Reference(3, **case)
    with jax.enable_x64(True):
        state = moving_average_batch_norm_state(3, window=case["window"], dtype=jnp.float64)
        jmask = None if mask is None else jnp.asarray(mask)[:, None]
        step = jax.jit(lambda *a: _step(*a, mask=jmask, **options))
        for t in range(steps):
            y, (dx, dscale, dbias), probe_grad, state = step(
                xs[t], dys[t], jnp.asarray(scale), jnp.asarray(bias), state
            )
            y_ref, dx_ref, dscale_ref, dbias_ref, (g_ref, psi_ref) = reference.step(
                xs[t], dys[t], scale, bias, mask
            )
            np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(probe_grad[0], g_ref, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(probe_grad[1], psi_ref, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(state.mean, reference.mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(state.var, reference.var, rtol=1e-12)
        assert int(state.count) == int(state.backward_count) == steps
        assert int(state.skipped) == 0


def test_window_one_centered_without_renorm_is_batch_norm():
    """With m = 1, all four statistics and no renormalization, MABN is BN: outputs, gradients
    (all of x, scale, bias, by autodiff of BN) and the running statistics."""
    xs, dys = _batches(3, n=5, c=4, seed=3)
    with jax.enable_x64(True):
        state = moving_average_batch_norm_state(4, window=1, dtype=jnp.float64)
        bn_state = bnjax.batch_norm_state(4, dtype=jnp.float64)
        scale, bias = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)
        for t in range(3):
            x, dy = jnp.asarray(xs[t]), jnp.asarray(dys[t])
            y, grads, _, state = _step(
                x, dy, scale, bias, state, centered=True, r_max=1.0, d_max=0.0, momentum=0.9
            )

            def bn_loss(x, scale, bias, bn_state=bn_state, dy=dy):
                y, new = bnjax.batch_norm(x, bn_state, scale, bias, training=True, momentum=0.9)
                return jnp.sum(y * dy), (y, new)

            bn_grads, (bn_y, bn_state) = jax.grad(bn_loss, (0, 1, 2), has_aux=True)(x, scale, bias)
            chex.assert_trees_all_close(y, bn_y, rtol=1e-12, atol=1e-12)
            chex.assert_trees_all_close(grads, bn_grads, rtol=1e-10, atol=1e-12)
            chex.assert_trees_all_close(
                (state.mean, state.var), (bn_state.mean, bn_state.var), rtol=1e-12
            )


def test_train_equals_eval_when_the_state_holds_the_batch_statistics():
    """Unclipped renormalization normalizes with the EMAS, which evaluation uses."""
    x = jax.random.normal(jax.random.key(0), (16, 2, 2, 5)) * 3.0
    unclipped = dict(r_max=1e6, d_max=1e6, renorm_warmup_steps=0)
    for centered in (False, True):
        state = moving_average_batch_norm_state(5, window=3)
        # Two steps with the same batch fill the history and the EMAS (momentum 0) with x's.
        for _ in range(2):
            _, state = moving_average_batch_norm(
                x, state, training=True, momentum=0.0, centered=centered, **unclipped
            )
        train, _ = moving_average_batch_norm(
            x, state, training=True, momentum=0.0, centered=centered, **unclipped
        )
        evaluation, same = moving_average_batch_norm(x, state, training=False)
        chex.assert_trees_all_close(train, evaluation, atol=2e-6)
        assert same is state
        moments = x.reshape(-1, 5)
        expected = moments.var(0) if centered else jnp.mean(moments**2, 0)
        chex.assert_trees_all_close(state.var, expected, rtol=1e-5)


def test_history_is_a_ring_of_the_last_steps():
    state = moving_average_batch_norm_state(1, window=3)
    for value in (1.0, 2.0, 3.0):
        x = jnp.array([[value], [-value]])  # second moment value**2
        _, state = moving_average_batch_norm(x, state, training=True)
    assert state.var_history[:, 0].tolist() == [9.0, 4.0]  # slot 0 overwritten by step 3
    probe = moving_average_batch_norm_probe(state)
    for value in (1.0, 2.0, 3.0):
        state = moving_average_batch_norm_backward_update(state, probe + value)
    assert state.grad_scaled_history[:, 0].tolist() == [3.0, 2.0]
    assert int(state.count) == int(state.backward_count) == 3


def test_non_finite_statistics_are_left_out():
    state = moving_average_batch_norm_state(2, window=2)
    x = jnp.array([[1.0, jnp.nan], [2.0, 1.0]])
    _, new = moving_average_batch_norm(x, state, training=True)
    assert int(new.skipped) == 1 and int(new.count) == 0
    chex.assert_trees_all_equal(new.var_history, state.var_history)
    bad = moving_average_batch_norm_probe(state).at[1, 0].set(jnp.inf)
    unchanged = moving_average_batch_norm_backward_update(state, bad)
    assert int(unchanged.backward_count) == 0


def test_gradient_of_scale_and_bias_is_exact_float64():
    """Only dx is deliberately inexact; scale and bias enter y by plain autodiff."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
        state = moving_average_batch_norm_state(3, window=2, dtype=jnp.float64)
        _, state = moving_average_batch_norm(x * 2, state, training=True)

        def f(scale, bias):
            return moving_average_batch_norm(x, state, scale, bias, training=True)[0]

        check_grads(f, (jnp.ones(3), jnp.zeros(3)), order=2, modes=["rev"])
        evaluation = lambda x: moving_average_batch_norm(x, state, training=False)[0]  # noqa: E731
        check_grads(evaluation, (x,), order=2)


def test_eight_devices_equal_one():
    devices = 8
    mesh = jax.make_mesh((devices,), ("batch",))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, (devices * 3, 2, 4)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(devices * 3, 1, 1)) > 0.3)
    state = moving_average_batch_norm_state(4, window=3)
    _, state = moving_average_batch_norm(x * 0.5, state, training=True)
    state = moving_average_batch_norm_backward_update(state, jnp.full((2, 4), 0.01))

    def run(x, cotangent, mask, axis_name):
        probe = moving_average_batch_norm_probe(state)

        def loss(x, probe):
            y, new = moving_average_batch_norm(
                x, state, None, None, probe, training=True, centered=True, mask=mask,
                axis_name=axis_name, renorm_warmup_steps=0,
            )  # fmt: skip
            total = jnp.sum(y * cotangent)  # the global loss: cotangents are global
            return total, (y, new)

        (dx, probe_grad), (y, new) = jax.grad(loss, (0, 1), has_aux=True)(x, probe)
        return y, dx, probe_grad, new

    whole = run(x, cotangent, mask, None)
    sharded = jax.jit(
        jax.shard_map(
            lambda *a: run(*a, "batch"),
            mesh=mesh,
            in_specs=P("batch"),
            out_specs=(P("batch"), P("batch"), P(), P()),
        )
    )(*jax.device_put((x, cotangent, mask), NamedSharding(mesh, P("batch"))))
    chex.assert_trees_all_close(sharded, whole, atol=2e-5, rtol=2e-5)


def test_bfloat16_input_keeps_float32_statistics():
    x = jax.random.normal(jax.random.key(2), (32, 4)) * 50.0 + 10.0
    state = moving_average_batch_norm_state(4, window=2)
    y16, s16 = moving_average_batch_norm(x.astype(jnp.bfloat16), state, training=True)
    y32, s32 = moving_average_batch_norm(x.astype(jnp.bfloat16).astype(jnp.float32), state,
                                         training=True)  # fmt: skip
    assert y16.dtype == jnp.bfloat16 and s16.var.dtype == jnp.float32
    chex.assert_trees_all_close(s16, s32, rtol=1e-6)
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=0.02, rtol=0.02)
    dx = jax.grad(lambda x: moving_average_batch_norm(x, state, training=True)[0].sum()
                  .astype(jnp.float32))(x.astype(jnp.bfloat16))  # fmt: skip
    assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s, training=1), TypeError,
         "training"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 2)), s, training=True), ValueError,
         "state.mean"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s, training=True, r_max=0.5),
         ValueError, "r_max"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s, training=True, momentum=None),
         ValueError, "momentum"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s, None, None, jnp.zeros(3),
                                             training=True), ValueError, "probe"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s._replace(var_history=jnp.ones(
            (2, 3))), training=True), ValueError, "var_history"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), bnjax.batch_norm_state(3),
                                             training=True), TypeError, "MovingAverage"),
        (lambda s: moving_average_batch_norm_backward_update(s, jnp.zeros((3,))), ValueError,
         "probe_grad"),
        (lambda s: moving_average_batch_norm_state(3, window=0), ValueError, "window"),
        (lambda s: moving_average_batch_norm(jnp.ones((4, 3)), s, training=True,
                                             renorm_warmup_steps=-1), ValueError, "warmup"),
    ],
)  # fmt: skip
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(moving_average_batch_norm_state(3, window=4))


def test_public_names():
    assert bnjax.moving_average_batch_norm is moving_average_batch_norm
    assert bnjax.MovingAverageBatchNormState is MovingAverageBatchNormState
    assert bnjax.moving_average_batch_norm_backward_update is (
        moving_average_batch_norm_backward_update
    )
