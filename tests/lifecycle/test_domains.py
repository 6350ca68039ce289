"""The lifecycle of domain batch norms: recalibrate sets each domain's row to the exact
population statistics of that domain's layer inputs; fold_model keeps the layer (D affines do
not fit one kernel); select_domain turns one domain into a batch norm that folds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bnjax import lifecycle, models
from bnjax import nnx as bnnx

X = jax.random.normal(jax.random.key(0), (32, 3)) * 2.0 + 1.0
DOMAIN = jnp.array([0, 2] * 16)  # domain 1 never appears


def _by_domain(module, x, domain):
    return module(x, train=False, domain=domain)


def test_recalibrate_sets_each_domains_population_statistics():
    model = models.MLP(
        features=(4,), num_classes=2, norm="domain_batch", norm_options={"num_domains": 3}
    )
    variables = model.init(jax.random.key(1), X, train=False)
    batches = [(X[:16], DOMAIN[:16]), (X[16:], DOMAIN[16:])]
    with pytest.warns(UserWarning, match="no valid value"):  # domain 1: kept, and said so
        new = lifecycle.recalibrate(model, variables, batches, apply_kwargs={"method": _by_domain})
    layer_input = np.asarray(X, np.float64) @ np.asarray(
        variables["params"]["dense0"]["kernel"], np.float64
    )
    stats = new["batch_stats"]["norm0"]
    for d in (0, 2):
        chosen = layer_input[np.asarray(DOMAIN) == d]
        np.testing.assert_allclose(stats["mean"][d], chosen.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"][d], chosen.var(0), rtol=1e-5)
    np.testing.assert_array_equal(stats["mean"][1], variables["batch_stats"]["norm0"]["mean"][1])
    np.testing.assert_array_equal(stats["var"][1], variables["batch_stats"]["norm0"]["var"][1])
    # Without a domain the layer's default domain takes every example; with none, refused.
    strict = models.MLP(
        features=(4,), num_classes=2, norm="domain_batch", norm_options={"default_domain": None}
    )
    strict_variables = strict.init(jax.random.key(1), X, train=False, domain=DOMAIN % 2)
    with pytest.raises(TypeError, match="needs `domain`"):
        lifecycle.recalibrate(strict, strict_variables, [X], apply_kwargs={"train": False})


def test_recalibrate_counters_per_domain_and_nnx_refuses_clearly():
    model = models.MLP(
        features=(4,),
        num_classes=2,
        norm="domain_batch",
        norm_options={"num_domains": 3, "track_counters": True},
    )
    variables = model.init(jax.random.key(1), X, train=False)
    batches = [(X[:16], DOMAIN[:16]), (X[16:], DOMAIN[16:])]
    with pytest.warns(UserWarning, match="no valid value"):
        new = lifecycle.recalibrate(model, variables, batches, apply_kwargs={"method": _by_domain})
    assert new["batch_stats"]["norm0"]["count"].tolist() == [2, 2, 2]
    nnx_model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), bnnx.DomainBatchNorm(4, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match="recalibrate_nnx does not set the per-domain"):
        lifecycle.recalibrate_nnx(nnx_model, [X])


def test_fold_model_keeps_domain_norms_and_select_domain_folds_one():
    x = jax.random.normal(jax.random.key(2), (8, 6, 6, 2))
    domain = jnp.array([0, 1] * 4)
    two = models.SmallCNN(features=(4,), num_classes=3, norm="domain_batch")
    variables = two.init(jax.random.key(3), x, train=False)
    _, updates = two.apply(variables, x, train=True, domain=domain, mutable=["batch_stats"])
    params = jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(4), a.shape), variables["params"]
    )
    variables = {"params": params, **updates}
    kept = lifecycle.fold_model(two, variables, x, train=False)
    np.testing.assert_array_equal(kept(x), two.apply(variables, x, train=False))
    assert "nothing to fold" in repr(kept)
    one = models.SmallCNN(features=(4,), num_classes=3, norm="batch")
    for d in (0, 1):
        selected = lifecycle.select_domain(two, variables, d, x, train=False)
        folded = lifecycle.fold_model(one, selected, x, train=False)
        assert "1 of 1 batch norm(s) folded" in repr(folded)
        expected = two.apply(variables, x, train=False, domain=d)
        np.testing.assert_allclose(folded(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`domain`=2 is outside \[0, 2\)"):
        lifecycle.select_domain(two, variables, 2, x, train=False)
    with pytest.raises(ValueError, match="no DomainBatchNorm"):
        lifecycle.select_domain(one, selected, 0, x, train=False)
