"""Test-time adaptation (`bnjax.lifecycle.adapter`, `adapter_nnx`, `adapt_statistics`):
each method's update against a float64 reference written from its paper's equations (TENT
Eq. 2 and its update; DELTA's TBR, Sec. 3.2, and DOT, Sec. 3.3; AdaBN), on a tiny model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bnjax import lifecycle
from bnjax import linen as bnn

EPS = 1e-5
LR = 0.5


class Tiny(nn.Module):
    """x (N, 3) -> dense (4) -> batch norm -> relu -> head (3 classes)."""

    norm: type = bnn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(4, name="dense")(x)
        h = self.norm(use_running_average=not train, epsilon=EPS, name="bn")(h)
        return nn.Dense(3, name="head")(nn.relu(h))


def _setup(norm=bnn.BatchNorm, seed=0):
    model = Tiny(norm=norm)
    x = jax.random.normal(jax.random.key(seed), (16, 3))
    variables = model.init(jax.random.key(1), x)
    # Source statistics that differ from any test batch's.
    stats = {"mean": jnp.array([0.3, -0.2, 0.1, 0.5]), "var": jnp.array([0.8, 1.5, 0.6, 2.0])}
    variables = {"params": variables["params"], "batch_stats": {"bn": stats}}
    return model, variables


def _batches(count, seed=10, shift=1.5):
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(k, (16, 3)) * 2.0 + shift for k in keys]


def _f64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _hidden(params, x):
    return x @ params["dense"]["kernel"] + params["dense"]["bias"]


def _head(params, h_norm):
    return jax.nn.relu(h_norm) @ params["head"]["kernel"] + params["head"]["bias"]


def _entropy(logits):
    log_p = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _sgd_on_norm(params, grads_scale_bias):
    """p <- p - lr g on the norm's scale and bias only (plain SGD, the reference update)."""
    new = jax.tree.map(lambda v: v, params)
    new["bn"] = {
        "scale": params["bn"]["scale"] - LR * grads_scale_bias[0],
        "bias": params["bn"]["bias"] - LR * grads_scale_bias[1],
    }
    return new


def tent_reference(params, x):
    """One TENT step in float64: logits with the batch's statistics, then SGD on the entropy."""

    def logits_of(scale, bias):
        h = _hidden(params, x)
        mu, var = h.mean(0), h.var(0)
        return _head(params, scale * (h - mu) / jnp.sqrt(var + EPS) + bias)

    scale, bias = params["bn"]["scale"], params["bn"]["bias"]
    logits = logits_of(scale, bias)
    grads = jax.grad(lambda s, b: _entropy(logits_of(s, b)).mean(), argnums=(0, 1))(scale, bias)
    return logits, _sgd_on_norm(params, grads)


def delta_reference(params, x, mean_ema, std_ema, prior, momentum=0.95, class_momentum=0.95):
    """One DELTA step in float64: TBR (r, d from the moving statistics, stop-gradient), the
    DOT-weighted entropy, SGD, then the moving statistics and the class prior."""
    h = _hidden(params, x)

    def logits_of(scale, bias):
        mu_b, sigma_b = h.mean(0), jnp.sqrt(h.var(0) + EPS)
        r = jax.lax.stop_gradient(sigma_b) / std_ema
        d = (jax.lax.stop_gradient(mu_b) - mean_ema) / std_ema
        return _head(params, scale * ((h - mu_b) / sigma_b * r + d) + bias)

    def loss(scale, bias):
        logits = logits_of(scale, bias)
        class_weight = (1 / prior) / jnp.sum(1 / prior)
        w = class_weight[jnp.argmax(logits, -1)]
        w = jax.lax.stop_gradient(w * len(w) / jnp.sum(w))
        return jnp.mean(w * _entropy(logits))

    scale, bias = params["bn"]["scale"], params["bn"]["bias"]
    logits = logits_of(scale, bias)
    grads = jax.grad(loss, argnums=(0, 1))(scale, bias)
    mu_b, sigma_b = h.mean(0), jnp.sqrt(h.var(0) + EPS)
    new_mean = momentum * mean_ema + (1 - momentum) * mu_b
    new_std = momentum * std_ema + (1 - momentum) * sigma_b
    p = jax.nn.softmax(logits)
    new_prior = class_momentum * prior + (1 - class_momentum) * p.mean(0)
    return logits, _sgd_on_norm(params, grads), new_mean, new_std, new_prior


def _close(a, b, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


def test_source_is_evaluation_mode_and_test_batch_is_flax_training_mode():
    model, variables = _setup(norm=nn.BatchNorm)  # flax's own BatchNorm
    x = _batches(1)[0]
    source = lifecycle.adapter(model, variables, method="source")
    logits, _ = source.step(source.init(), x)
    np.testing.assert_array_equal(logits, model.apply(variables, x))
    test_batch = lifecycle.adapter(model, variables, method="test_batch")
    logits, _ = test_batch.step(test_batch.init(), x)
    want, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    _close(logits, want)


@pytest.mark.parametrize("norm", [bnn.BatchNorm, nn.BatchNorm], ids=["bnjax", "flax"])
def test_tent_step_matches_the_float64_reference_and_changes_only_the_norm(norm):
    model, variables = _setup(norm=norm)
    tent = lifecycle.adapter(model, variables, method="tent", optimizer=optax.sgd(LR))
    state = tent.init()
    params = _f64(variables["params"])
    for x in _batches(3):
        logits, state = jax.jit(tent.step)(state, x)
        with jax.enable_x64(True):
            want_logits, params = tent_reference(params, np.asarray(x, np.float64))
        _close(logits, want_logits)
        _close(state.params["bn"]["scale"], params["bn"]["scale"])
        _close(state.params["bn"]["bias"], params["bn"]["bias"])
    for name in ("dense", "head"):  # bit for bit as trained
        for leaf, kept in zip(
            jax.tree.leaves(state.params[name]),
            jax.tree.leaves(variables["params"][name]),
            strict=True,
        ):
            np.testing.assert_array_equal(leaf, kept)
    assert not np.allclose(state.params["bn"]["scale"], variables["params"]["bn"]["scale"])


def test_delta_steps_match_the_float64_reference():
    model, variables = _setup()
    delta = lifecycle.adapter(
        model, variables, method="delta", optimizer=optax.sgd(LR), num_classes=3
    )
    state = delta.init()
    params = _f64(variables["params"])
    stats = _f64(variables["batch_stats"]["bn"])
    mean_ema, std_ema = stats["mean"], np.sqrt(stats["var"] + EPS)  # init="source"
    prior = np.full(3, 1 / 3)
    for x in _batches(4, shift=2.5):
        logits, state = jax.jit(delta.step)(state, x)
        with jax.enable_x64(True):
            want_logits, params, mean_ema, std_ema, prior = delta_reference(
                params, np.asarray(x, np.float64), mean_ema, std_ema, prior
            )
        _close(logits, want_logits)
        _close(state.params["bn"]["scale"], params["bn"]["scale"])
        _close(state.params["bn"]["bias"], params["bn"]["bias"])
        _close(state.norm_states["bn"].mean, mean_ema)
        _close(state.norm_states["bn"].std, std_ema)
        _close(state.class_prior, prior)
    assert not np.allclose(prior, 1 / 3)  # DOT's weights were exercised


def test_adabn_online_normalizes_with_the_stream_so_far():
    model, variables = _setup()
    adabn = lifecycle.adapter(model, variables, method="adabn")
    state = adabn.init()
    params = _f64(variables["params"])
    seen = []
    for x in _batches(3):
        logits, state = adabn.step(state, x)
        seen.append(np.asarray(x, np.float64))
        with jax.enable_x64(True):
            h_all = _hidden(params, np.concatenate(seen))
            h = _hidden(params, seen[-1])
            normed = (h - h_all.mean(0)) / jnp.sqrt(h_all.var(0) + EPS)
            want = _head(params, params["bn"]["scale"] * normed + params["bn"]["bias"])
        _close(logits, want)


def test_adapt_statistics_is_recalibration_with_a_mixture_blend():
    model, variables = _setup()
    batches = _batches(2)
    full = lifecycle.adapt_statistics(model, variables, batches)
    params = _f64(variables["params"])
    h = np.asarray(_hidden(params, np.concatenate([np.asarray(b, np.float64) for b in batches])))
    _close(full["batch_stats"]["bn"]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
    _close(full["batch_stats"]["bn"]["var"], h.var(0), rtol=1e-5, atol=1e-5)
    half = lifecycle.adapt_statistics(model, variables, batches, target_weight=0.25)
    src = _f64(variables["batch_stats"]["bn"])
    want_mean = 0.75 * src["mean"] + 0.25 * h.mean(0)
    want_var = 0.75 * src["var"] + 0.25 * h.var(0) + 0.25 * 0.75 * (src["mean"] - h.mean(0)) ** 2
    _close(half["batch_stats"]["bn"]["mean"], want_mean, rtol=1e-5, atol=1e-5)
    _close(half["batch_stats"]["bn"]["var"], want_var, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn"]["mean"], src["mean"].astype(np.float32)
    )


def test_episodic_mode_resets_to_the_source_exactly():
    model, variables = _setup()
    make = functools.partial(
        lifecycle.adapter, model, variables, method="tent", optimizer=optax.adam(0.1)
    )
    episodic = make(episodic=True)
    a, b = _batches(2)
    state = episodic.init()
    _, state = episodic.step(state, a)
    logits_b, state = episodic.step(state, b)
    fresh = make()
    want_b, _ = fresh.step(fresh.init(), b)
    np.testing.assert_array_equal(logits_b, want_b)
    reset = episodic.reset(state)
    for got, want in zip(jax.tree.leaves(reset), jax.tree.leaves(episodic.init()), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(state.step) == 2


def test_a_stream_under_scan_equals_the_python_loop():
    model, variables = _setup()
    delta = lifecycle.adapter(
        model, variables, method="delta", optimizer=optax.adam(1e-2), num_classes=3
    )
    batches = _batches(5)
    state, loop = delta.init(), []
    for x in batches:
        logits, state = delta.step(state, x)
        loop.append(logits)
    final, scanned = jax.jit(
        lambda s, xs: jax.lax.scan(lambda c, x: delta.step(c, x)[::-1], s, xs)
    )(delta.init(), jnp.stack(batches))
    _close(scanned, jnp.stack(loop), rtol=1e-6, atol=1e-6)
    _close(final.params["bn"]["scale"], state.params["bn"]["scale"], rtol=1e-6, atol=1e-6)


class TinyNnx(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, epsilon=EPS, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.dense(x))))


def test_nnx_tent_matches_the_reference_and_leaves_the_model_alone():
    model = TinyNnx(nnx.Rngs(0))
    model.bn.mean[...] = jnp.array([0.3, -0.2, 0.1, 0.5])
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    tent = lifecycle.adapter_nnx(model, method="tent", optimizer=optax.sgd(LR))
    state = tent.init()
    params = _f64(
        {
            "dense": {"kernel": model.dense.kernel[...], "bias": model.dense.bias[...]},
            "bn": {"scale": model.bn.scale[...], "bias": model.bn.bias[...]},
            "head": {"kernel": model.head.kernel[...], "bias": model.head.bias[...]},
        }
    )
    for x in _batches(2):
        logits, state = jax.jit(tent.step)(state, x)
        with jax.enable_x64(True):
            want_logits, params = tent_reference(params, np.asarray(x, np.float64))
        _close(logits, want_logits)
        _close(state.params["bn"]["scale"], params["bn"]["scale"])
    np.testing.assert_array_equal(state.params["dense"]["kernel"], before["dense"]["kernel"])
    after = nnx.to_pure_dict(nnx.state(model))
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(got, want)


def _blobs(seed, n_per_class=80, shift=0.0):
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [-1.0, -2.0, 1.0]])
    labels = np.repeat(np.arange(3), n_per_class)
    x = centers[labels] + rng.normal(0, 0.6, (len(labels), 3)) + shift
    return x.astype(np.float32), labels


def test_delta_does_not_fall_below_the_source_on_a_one_class_stream():
    """The dependent-stream failure in a fixed tiny case: test-batch statistics of one class
    collapse the predictions; DELTA's moving statistics keep (here: improve on) the source's.
    The margin, 0.015, is below the narrowest 95% half-width of DELTA's one-class cells in
    docs/adaptation/table.md (0.018); on clusters at B <= 16 the table shows DELTA below the
    source model by more than that, which this fixed case does not claim otherwise."""
    model = Tiny()
    x, y = _blobs(0)
    variables = model.init(jax.random.key(0), x[:2])
    tx = optax.adam(0.05)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, stats, opt_state):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(params)
        step, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, step), updates["batch_stats"], opt_state

    for _ in range(150):
        params, stats, opt_state = train_step(params, stats, opt_state)
    trained = {"params": params, "batch_stats": stats}
    test_x, test_y = _blobs(1, shift=np.array([0.8, -0.6, 0.5], np.float32))
    order = np.argsort(test_y, kind="stable")  # one class at a time
    batches = jnp.asarray(test_x[order].reshape(-1, 16, 3))

    def accuracy(method, **options):
        adapter = lifecycle.adapter(model, trained, method=method, **options)
        _, logits = jax.lax.scan(lambda s, b: adapter.step(s, b)[::-1], adapter.init(), batches)
        return float(np.mean(np.argmax(logits.reshape(-1, 3), -1) == test_y[order]))

    source = accuracy("source")
    delta = accuracy("delta", optimizer=optax.adam(1e-3), num_classes=3)
    test_batch = accuracy("test_batch")
    assert delta >= source - 0.015, (delta, source)
    assert test_batch < source - 0.2, (test_batch, source)  # the case does discriminate


def test_bad_options_are_refused_by_name():
    model, variables = _setup()
    with pytest.raises(ValueError, match="method"):
        lifecycle.adapter(model, variables, method="tnet")
    with pytest.raises(ValueError, match="optimizer"):
        lifecycle.adapter(model, variables, method="tent")
    with pytest.raises(ValueError, match="num_classes"):
        lifecycle.adapter(model, variables, method="delta", optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="statistics options"):
        lifecycle.adapter(model, variables, method="tbr", statistics_options={"decay": 0.9})
    with pytest.raises(ValueError, match="init"):
        lifecycle.adapter(model, variables, method="tbr", statistics_options={"init": "zeros"})
    with pytest.raises(ValueError, match="batch_stats"):
        lifecycle.adapter(model, {"params": variables["params"]}, method="tbr")
    with pytest.raises(ValueError, match="target_weight"):
        lifecycle.adapt_statistics(model, variables, _batches(1), target_weight=1.5)


def test_a_layer_called_twice_is_refused():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            norm = bnn.BatchNorm(use_running_average=not train)
            return nn.Dense(3)(norm(norm(nn.Dense(4)(x))))

    model = Twice()
    variables = model.init(jax.random.key(0), jnp.ones((4, 3)))
    tbr = lifecycle.adapter(model, variables, method="tbr")
    with pytest.raises(ValueError, match="more than once"):
        tbr.step(tbr.init(), jnp.ones((4, 3)))


def test_domain_batch_norm_is_refused_with_the_fix():
    from bnjax import models

    model = models.MLP(features=(4,), num_classes=3, norm="domain_batch")
    variables = model.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
    tbr = lifecycle.adapter(model, variables, method="tbr", apply_kwargs={"train": False})
    with pytest.raises(ValueError, match="cannot be adapted"):
        tbr.step(tbr.init(), jnp.ones((4, 3)))
