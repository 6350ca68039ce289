"""bnjax.linen.DomainBatchNorm and bnjax.nnx.DomainBatchNorm: the core's numbers, the
variables, the options; the bundled models with norm='domain_batch' (every example domain 0
by default: batch norm to rounding) and with a per-example domain. The training loop with
norm='domain_batch': tests/train/test_hardening.py's norm parametrization."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax import linen as bnn
from bnjax import models
from bnjax import nnx as bnnx

X = jax.random.normal(jax.random.key(0), (8, 3, 3, 4)) * 2.0 + 1.0
DOMAIN = jnp.array([0, 1, 1, 0, 2, 0, 1, 0])


def test_linen_matches_core_and_keeps_per_domain_variables():
    bn = bnn.DomainBatchNorm(num_domains=3, use_running_average=False, momentum=0.9)
    variables = bn.init(jax.random.key(1), X, domain=DOMAIN)
    assert jax.tree.map(jnp.shape, variables) == {
        "batch_stats": {"mean": (3, 4), "var": (3, 4)},
        "params": {"bias": (3, 4), "scale": (3, 4)},
    }
    params = {
        "scale": jax.random.normal(jax.random.key(2), (3, 4)) + 1.0,
        "bias": jax.random.normal(jax.random.key(3), (3, 4)),
    }
    y, updates = bn.apply(
        {**variables, "params": params}, X, domain=DOMAIN, mutable=["batch_stats"]
    )
    y_core, state = bnjax.domain_batch_norm(
        X,
        bnjax.domain_batch_norm_state(3, 4),
        params["scale"],
        params["bias"],
        domain=DOMAIN,
        training=True,
        momentum=0.9,
    )
    np.testing.assert_array_equal(y, y_core)
    np.testing.assert_array_equal(updates["batch_stats"]["mean"], state.mean)
    shared = bnn.DomainBatchNorm(num_domains=3, per_domain_affine=False, track_counters=True)
    shapes = jax.tree.map(jnp.shape, shared.init(jax.random.key(1), X, True, domain=DOMAIN))
    assert shapes["params"] == {"bias": (4,), "scale": (4,)}
    assert shapes["batch_stats"]["count"] == (3,)


def test_nnx_equals_linen_in_training_and_evaluation():
    linen_bn = bnn.DomainBatchNorm(num_domains=3, use_running_average=False)
    variables = linen_bn.init(jax.random.key(1), X, domain=DOMAIN)
    nnx_bn = bnnx.DomainBatchNorm(4, num_domains=3, rngs=nnx.Rngs(0))
    y_linen, updates = linen_bn.apply(variables, X, domain=DOMAIN, mutable=["batch_stats"])
    y_nnx = nnx_bn(X, domain=DOMAIN)
    np.testing.assert_array_equal(y_nnx, y_linen)
    np.testing.assert_array_equal(nnx_bn.mean[...], updates["batch_stats"]["mean"])
    nnx_bn.eval()
    evaluated = bnn.DomainBatchNorm(num_domains=3).apply(
        {**variables, **updates}, X, True, domain=DOMAIN
    )
    np.testing.assert_array_equal(nnx_bn(X, domain=DOMAIN), evaluated)


def test_module_options_and_errors():
    with pytest.raises(ValueError, match="track_counters"):
        bnn.DomainBatchNorm(momentum=None).init(jax.random.key(0), X, False)
    with pytest.raises(TypeError, match="`domain`"):
        bnn.DomainBatchNorm(default_domain=None).init(jax.random.key(0), X, True)
    with pytest.raises(ValueError, match="`domain` holds indices"):
        bnn.DomainBatchNorm(num_domains=2).init(jax.random.key(0), X, True, domain=DOMAIN)
    with pytest.raises(ValueError, match="num_domains"):
        bnnx.DomainBatchNorm(4, num_domains=0, rngs=nnx.Rngs(0))
    counted = bnnx.DomainBatchNorm(
        4, num_domains=3, momentum=None, track_counters=True, rngs=nnx.Rngs(0)
    )
    counted(X, domain=DOMAIN)
    counted(X[:4], domain=DOMAIN[:4])  # domain 2 absent from the second batch
    assert counted.count[...].tolist() == [2, 2, 1]


def test_models_route_the_domain_and_default_to_domain_zero_equal_batch_norm():
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 3))
    domain_model = models.SmallCNN(features=(4, 6), num_classes=3, norm="domain_batch")
    batch_model = models.SmallCNN(features=(4, 6), num_classes=3, norm="batch")
    variables = domain_model.init(jax.random.key(5), x, train=False)
    batch_variables = batch_model.init(jax.random.key(5), x, train=False)
    chex.assert_trees_all_equal(variables["params"]["conv0"], batch_variables["params"]["conv0"])
    logits, updates = domain_model.apply(variables, x, train=True, mutable=["batch_stats"])
    expected, batch_updates = batch_model.apply(
        batch_variables, x, train=True, mutable=["batch_stats"]
    )
    # Every example in domain 0: batch norm up to rounding (masked vs plain reductions).
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    for layer in ("norm0", "norm1"):
        np.testing.assert_allclose(
            updates["batch_stats"][layer]["mean"][0],
            batch_updates["batch_stats"][layer]["mean"],
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_array_equal(updates["batch_stats"][layer]["mean"][1], 0.0)
    # A per-example domain reaches every norm of the bundled models.
    domain = jnp.array([0, 1] * 4)
    for model in (
        domain_model,
        models.MLP(features=(5,), num_classes=3, norm="domain_batch"),
    ):  # the ResNets: tests/train/test_hardening.py (slow) trains them with 'domain_batch'
        variables = model.init(jax.random.key(6), x, train=False)
        _, updates = model.apply(variables, x, train=True, domain=domain, mutable=["batch_stats"])
        means = [
            v["mean"]
            for v in jax.tree.leaves(
                updates["batch_stats"], is_leaf=lambda n: isinstance(n, dict) and "mean" in n
            )
        ]
        assert means and all(not np.allclose(m[1], m[0]) for m in means)
