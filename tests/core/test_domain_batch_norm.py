"""domain_batch_norm against a float64 NumPy reference of the per-domain formula (DSBN Eq. 2):
each domain normalized by the moments of its own valid examples, each domain's running
statistics updated from those alone, each example evaluated with its domain's row."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bnjax

D, C = 3, 4
SHAPE = (12, 2, 3, C)
DOMAIN = np.array([0, 2, 0, 2, 2, 0, 0, 2, 0, 2, 0, 0])  # domain 1 absent


def _random(shape, seed, loc=0.0, scale=1.0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), shape) * scale + loc).astype(dtype)


def reference(x, domain, scale, bias, mean, var, *, momentum, epsilon, mask=None):
    """Float64 NumPy: (y, new mean, new var) of domain-specific batch norm, features last.

    scale/bias are (D, C) (per domain). A domain with fewer than two valid values keeps its
    running statistics."""
    x = np.asarray(x, np.float64)
    valid = np.ones(x.shape[0], bool) if mask is None else np.asarray(mask)
    y = np.empty_like(x)
    new_mean, new_var = np.array(mean, np.float64), np.array(var, np.float64)
    for d in range(len(mean)):
        members = domain == d
        chosen = x[members & valid].reshape(-1, x.shape[-1])
        if len(chosen):
            mu = chosen.mean(0)
            sigma2 = ((chosen - mu) ** 2).mean(0)
        else:
            mu, sigma2 = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
        y[members] = scale[d] * (x[members] - mu) / np.sqrt(sigma2 + epsilon) + bias[d]
        if len(chosen) >= 2:
            new_mean[d] = momentum * mean[d] + (1 - momentum) * mu
            new_var[d] = momentum * var[d] + (1 - momentum) * sigma2
    return y, new_mean, new_var


def _params(seed=1):
    scale = np.asarray(_random((D, C), seed, loc=1.0), np.float64)
    bias = np.asarray(_random((D, C), seed + 1), np.float64)
    return scale, bias


def test_training_matches_float64_reference_and_absent_domain_unchanged():
    x = _random(SHAPE, 0, loc=3.0, scale=2.0)
    scale, bias = _params()
    state = bnjax.domain_batch_norm_state(D, C)
    state = state._replace(mean=state.mean + 0.5, var=state.var * 2.0)
    y, new = bnjax.domain_batch_norm(
        x,
        state,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        domain=jnp.asarray(DOMAIN),
        training=True,
        momentum=0.9,
    )
    y_ref, mean_ref, var_ref = reference(
        x, DOMAIN, scale, bias, state.mean, state.var, momentum=0.9, epsilon=1e-5
    )
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-6)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-5)
    np.testing.assert_array_equal(new.mean[1], state.mean[1])  # absent: bit for bit
    np.testing.assert_array_equal(new.var[1], state.var[1])
    assert new.count.tolist() == [1, 0, 1] and new.skipped.tolist() == [0, 0, 0]


def test_mixed_batch_with_mask_and_evaluation_uses_each_domains_row():
    x = _random(SHAPE, 3, loc=-1.0, scale=0.5)
    scale, bias = _params(4)
    mask = np.arange(12) % 5 != 1  # masked examples stay out of their domain's moments
    state = bnjax.domain_batch_norm_state(D, C)
    y, new = bnjax.domain_batch_norm(
        x,
        state,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        domain=jnp.asarray(DOMAIN),
        training=True,
        momentum=0.0,
        mask=jnp.asarray(mask).reshape(-1, 1, 1, 1),
    )
    y_ref, mean_ref, var_ref = reference(
        x, DOMAIN, scale, bias, state.mean, state.var, momentum=0.0, epsilon=1e-5, mask=mask
    )
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-5, atol=1e-7)
    # momentum 0 stores the batch statistics: evaluation of the unmasked examples then equals
    # training (train/eval equivalence, per domain).
    y_eval, same = bnjax.domain_batch_norm(
        x,
        new,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        domain=jnp.asarray(DOMAIN),
        training=False,
    )
    assert same is new
    if not mask.all():
        np.testing.assert_allclose(y_eval, y_ref, atol=2e-5, rtol=1e-5)
    evaluated = (np.asarray(x, np.float64) - np.asarray(new.mean)[DOMAIN][:, None, None]) / (
        np.sqrt(np.asarray(new.var)[DOMAIN][:, None, None] + 1e-5)
    ) * scale[DOMAIN][:, None, None] + bias[DOMAIN][:, None, None]
    np.testing.assert_allclose(y_eval, evaluated, atol=2e-5, rtol=1e-5)


def test_one_domain_equals_batch_norm_bit_for_bit():
    x = _random(SHAPE, 5, loc=2.0)
    scale, bias = _random((C,), 6, loc=1.0), _random((C,), 7)
    y, new = bnjax.domain_batch_norm(
        x, bnjax.domain_batch_norm_state(1, C), scale, bias, domain=0, training=True
    )
    y_bn, bn = bnjax.batch_norm(x, bnjax.batch_norm_state(C), scale, bias, training=True)
    np.testing.assert_array_equal(y, y_bn)
    np.testing.assert_array_equal(new.mean[0], bn.mean)
    np.testing.assert_array_equal(new.var[0], bn.var)
    grads = jax.grad(
        lambda x: jnp.sum(
            jnp.sin(
                bnjax.domain_batch_norm(
                    x, bnjax.domain_batch_norm_state(1, C), scale, domain=0, training=True
                )[0]
            )
        )
    )(x)
    grads_bn = jax.grad(
        lambda x: jnp.sum(
            jnp.sin(bnjax.batch_norm(x, bnjax.batch_norm_state(C), scale, training=True)[0])
        )
    )(x)
    np.testing.assert_array_equal(grads, grads_bn)


def test_shared_affine_equals_per_domain_copies_and_momentum_none_counts_per_domain():
    x = _random(SHAPE, 8)
    scale, bias = _random((C,), 9, loc=1.0), _random((C,), 10)
    shared, _ = bnjax.domain_batch_norm(
        x, bnjax.domain_batch_norm_state(D, C), scale, bias, domain=DOMAIN, training=True
    )
    copies, _ = bnjax.domain_batch_norm(
        x,
        bnjax.domain_batch_norm_state(D, C),
        jnp.tile(scale, (D, 1)),
        jnp.tile(bias, (D, 1)),
        domain=DOMAIN,
        training=True,
    )
    np.testing.assert_array_equal(shared, copies)
    # momentum=None: each domain's plain average over the batches it appeared in.
    state = bnjax.domain_batch_norm_state(2, C)
    batches = [
        (_random((6, C), 20 + i, loc=i), np.array(d))
        for i, d in enumerate([[0] * 6, [0, 0, 0, 1, 1, 1], [1] * 6])
    ]
    for x_i, d_i in batches:
        _, state = bnjax.domain_batch_norm(x_i, state, domain=d_i, training=True, momentum=None)
    assert state.count.tolist() == [2, 2]
    expected = [
        np.mean([np.asarray(x_i)[d_i == d].mean(0) for x_i, d_i in batches if (d_i == d).any()], 0)
        for d in range(2)
    ]
    np.testing.assert_allclose(state.mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gradients_check_grads_float64_and_match_reference_autodiff(shared):
    # order 2 (second derivatives) with the shared affine, under -m slow
    with jax.enable_x64(True):
        x = _random((10, 3, C), 11, loc=1.0, scale=2.0, dtype=jnp.float64)
        domain = jnp.array([0, 1, 1, 0, 2, 2, 0, 1, 2, 0])
        mask = jnp.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], bool).reshape(-1, 1, 1)
        shape = (C,) if shared else (D, C)
        scale = _random(shape, 12, loc=1.0, dtype=jnp.float64)
        bias = _random(shape, 13, dtype=jnp.float64)
        state = bnjax.domain_batch_norm_state(D, C)

        def ours(x, scale, bias):
            return bnjax.domain_batch_norm(
                x, state, scale, bias, domain=domain, training=True, mask=mask
            )[0]

        def plain(x, scale, bias):  # the formula, one domain at a time, autodiff
            y = jnp.zeros_like(x)
            for d in range(D):
                keep = (domain == d)[:, None, None] & mask
                count = jnp.sum(keep) * 3
                mu = jnp.sum(jnp.where(keep, x, 0), (0, 1)) / count
                sigma2 = jnp.sum(jnp.where(keep, (x - mu) ** 2, 0), (0, 1)) / count
                s, b = (scale, bias) if shared else (scale[d], bias[d])
                y_d = s * (x - mu) / jnp.sqrt(sigma2 + 1e-5) + b
                y = jnp.where((domain == d)[:, None, None], y_d, y)
            return y

        chex.assert_trees_all_close(ours(x, scale, bias), plain(x, scale, bias), atol=1e-12)
        check_grads(ours, (x, scale, bias), order=2 if shared else 1, modes=("fwd", "rev"))
        cotangent = _random(x.shape, 14, dtype=jnp.float64)
        grads = jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent), (0, 1, 2))(x, scale, bias)
        expected = jax.grad(lambda *a: jnp.sum(plain(*a) * cotangent), (0, 1, 2))(x, scale, bias)
        chex.assert_trees_all_close(grads, expected, atol=1e-10)


def test_bfloat16_input_keeps_float32_statistics():
    x = _random(SHAPE, 15, loc=100.0, scale=3.0)
    y, new = bnjax.domain_batch_norm(
        x.astype(jnp.bfloat16),
        bnjax.domain_batch_norm_state(D, C),
        domain=DOMAIN,
        training=True,
        momentum=0.0,
    )
    assert y.dtype == jnp.bfloat16 and new.mean.dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.bfloat16), np.float64)
    ones, zeros = np.ones((D, C)), np.zeros((D, C))
    y_ref, mean_ref, var_ref = reference(
        x64, DOMAIN, ones, zeros, np.zeros((D, C)), np.ones((D, C)), momentum=0.0, epsilon=1e-5
    )
    np.testing.assert_allclose(new.mean, mean_ref, rtol=1e-6)
    np.testing.assert_allclose(new.var, var_ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=0.02)


def test_non_finite_domain_is_skipped_and_others_update():
    x = np.array(_random((8, C), 16))
    x[0, 0] = np.nan  # the first example, of domain 1
    domain = np.array([1, 0, 0, 0, 0, 1, 1, 1])
    state = bnjax.domain_batch_norm_state(2, C)
    y, new = bnjax.domain_batch_norm(x, state, domain=domain, training=True)
    assert bool(jnp.all(jnp.isfinite(y[1:5])))  # domain 0 never sees domain 1's NaN
    grads = jax.grad(
        lambda x: jnp.sum(
            bnjax.domain_batch_norm(x, state, domain=domain, training=True)[0][1:5] ** 2
        )
    )(jnp.asarray(x))
    assert bool(jnp.all(jnp.isfinite(grads[1:5])))  # nor in its gradients
    np.testing.assert_array_equal(new.mean[1], state.mean[1])
    assert new.count.tolist() == [1, 0] and new.skipped.tolist() == [0, 1]
    assert bool(jnp.all(jnp.isfinite(new.mean))) and bool(jnp.all(jnp.isfinite(new.var)))
    poisoned = state._replace(mean=state.mean.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"state\.mean"):
        bnjax.domain_batch_norm(
            np.asarray(_random((8, C), 17)), poisoned, domain=domain, training=True
        )
    # traced: the state comes back unchanged, nothing counted
    with pytest.warns(RuntimeWarning, match=r"state\.mean"):
        _, after = jax.jit(
            lambda s: bnjax.domain_batch_norm(
                jnp.ones((8, C)) * jnp.arange(8.0)[:, None], s, domain=domain, training=True
            )
        )(poisoned)
        jax.block_until_ready(after)
    assert after.count.tolist() == [0, 0] and after.skipped.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(domain=np.array([0, 1, 2, 0])), ValueError, r"`domain` holds indices in \[0, 2\]"),
        (dict(domain=np.array([0, -1, 1, 0])), ValueError, "outside"),
        (dict(domain=np.array([0.0, 1.0, 1.0, 0.0])), TypeError, "`domain` must hold integer"),
        (dict(domain=np.array([True, False, True, False])), TypeError, "`domain`"),
        (dict(domain=np.array([0, 1, 1])), ValueError, r"`domain` must have shape \(4,\)"),
        (dict(domain=None), TypeError, "`domain` is required"),
        (dict(domain=0, axis=0), ValueError, "`axis`"),
        (dict(domain=0, scale=jnp.ones((3, 3))), ValueError, "`scale` has shape"),
        (dict(domain=0, state=bnjax.batch_norm_state(3)), TypeError, "DomainBatchNormState"),
        (dict(domain=0, state=bnjax.domain_batch_norm_state(2, 5)), ValueError, "state.mean"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    call = dict(state=bnjax.domain_batch_norm_state(2, 3), training=True) | kwargs
    state = call.pop("state")
    with pytest.raises(error, match=match):
        bnjax.domain_batch_norm(np.ones((4, 3), np.float32), state, **call)
    with pytest.raises(ValueError, match="num_domains"):
        bnjax.domain_batch_norm_state(0, 3)


def test_traced_out_of_range_domain_gives_nan_and_enters_no_statistics():
    x = _random((6, C), 18)
    run = jax.jit(
        lambda d: bnjax.domain_batch_norm(
            x, bnjax.domain_batch_norm_state(2, C), domain=d, training=True
        )
    )
    y, new = run(jnp.array([0, 0, 0, 1, 1, 5]))
    assert bool(jnp.all(jnp.isnan(y[5]))) and bool(jnp.all(jnp.isfinite(y[:5])))
    np.testing.assert_allclose(new.mean[1], 0.01 * np.asarray(x)[3:5].mean(0), rtol=1e-5)


def test_variance_stays_exact_when_the_mean_is_ten_thousand_stds():
    x = np.random.RandomState(0).randn(32, 4, 4, C) + 1e4
    x32 = jnp.asarray(x, jnp.float32)
    domain = np.arange(32) % 2
    mask = (np.arange(32) % 7 != 3).reshape(-1, 1, 1, 1)
    _, new = bnjax.domain_batch_norm(
        x32,
        bnjax.domain_batch_norm_state(2, C),
        domain=domain,
        training=True,
        momentum=0.0,
        mask=mask,
    )
    values = np.asarray(x32, np.float64)
    for d in range(2):
        chosen = values[(domain == d) & mask[:, 0, 0, 0]].reshape(-1, C)
        np.testing.assert_allclose(new.var[d], chosen.var(0), rtol=2e-6)
        np.testing.assert_allclose(new.mean[d], chosen.mean(0), rtol=1e-7)
