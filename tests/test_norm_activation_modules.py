"""FilterResponseNorm, EvoNormB0, EvoNormS0: linen and nnx modules over the core, the bundled
models (no ReLU after a norm that includes its activation), recalibration and fold_model."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax import lifecycle, models
from bnjax import linen as bnn
from bnjax import nnx as bnnx

X = jax.random.normal(jax.random.key(0), (8, 4, 4, 8)) * 2.0 + 0.5


def _random_params(variables, seed=1):
    """Params drawn away from their initial values, so a swapped parameter shows."""
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        jax.random.uniform(k, p.shape, p.dtype, 0.3, 1.5) for k, p in zip(keys, leaves, strict=True)
    ]
    return {**variables, "params": jax.tree.unflatten(tree, leaves)}


def test_linen_modules_call_the_core_with_their_params():
    frn = bnn.FilterResponseNorm()
    variables = _random_params(frn.init(jax.random.key(0), X))
    p = variables["params"]
    chex.assert_trees_all_close(
        frn.apply(variables, X),
        bnjax.filter_response_norm(X, p["scale"], p["bias"], p["threshold"]),
    )
    s0 = bnn.EvoNormS0(num_groups=4)
    variables = _random_params(s0.init(jax.random.key(0), X))
    p = variables["params"]
    chex.assert_trees_all_close(
        s0.apply(variables, X), bnjax.evonorm_s0(X, p["scale"], p["bias"], p["v"], num_groups=4)
    )
    b0 = bnn.EvoNormB0(momentum=0.9)
    variables = _random_params(b0.init(jax.random.key(0), X, use_running_average=False))
    p = variables["params"]
    y, updates = b0.apply(variables, X, use_running_average=False, mutable=["batch_stats"])
    y_core, state = bnjax.evonorm_b0(
        X, bnjax.evonorm_b0_state(8), p["scale"], p["bias"], p["v"], training=True, momentum=0.9
    )
    chex.assert_trees_all_close(y, y_core)
    chex.assert_trees_all_close(updates["batch_stats"]["var"], state.var)
    # Evaluation reads the running variance, and the call argument switches the mode.
    evaluated = b0.apply({**variables, **updates}, X, use_running_average=True)
    y_eval, _ = bnjax.evonorm_b0(
        X, state, p["scale"], p["bias"], p["v"], training=False, momentum=0.9
    )
    chex.assert_trees_all_close(evaluated, y_eval)


def test_activation_false_drops_the_activation_parameter():
    for module, name in [
        (bnn.FilterResponseNorm(activation=False), "threshold"),
        (bnn.EvoNormS0(num_groups=4, activation=False), "v"),
        (bnn.EvoNormB0(activation=False, use_running_average=True), "v"),
    ]:
        assert name not in module.init(jax.random.key(0), X)["params"]
        assert module.includes_activation


def test_frn_learns_epsilon_where_a_mean_square_covers_one_value():
    dense = jnp.ones((4, 8))
    assert "learned_epsilon" in bnn.FilterResponseNorm().init(jax.random.key(0), dense)["params"]
    assert "learned_epsilon" not in bnn.FilterResponseNorm().init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="learned_epsilon"):
        bnn.FilterResponseNorm(learned_epsilon=False).init(jax.random.key(0), dense)
    with pytest.raises(ValueError, match="learned_epsilon"):
        bnnx.FilterResponseNorm(8, rngs=nnx.Rngs(0))(dense)
    layer = bnnx.FilterResponseNorm(8, learned_epsilon=True, rngs=nnx.Rngs(0))
    assert layer(dense).shape == (4, 8)


def test_b0_counters_masks_and_low_precision():
    layer = bnn.EvoNormB0(use_running_average=False, momentum=None, track_counters=True)
    variables = layer.init(jax.random.key(0), X)
    assert sorted(variables["batch_stats"]) == ["count", "skipped", "var"]
    mask = jnp.arange(8)[:, None, None, None] < 5
    _, updates = layer.apply(variables, X, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], np.asarray(X[:5], np.float64).var((0, 1, 2)), rtol=1e-5
    )
    assert int(updates["batch_stats"]["count"]) == 1
    y = bnn.EvoNormB0(use_running_average=True, dtype=jnp.bfloat16).apply(variables, X)
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("linen_module", "nnx_module"),
    [
        (bnn.FilterResponseNorm(), functools.partial(bnnx.FilterResponseNorm, 8)),
        (bnn.EvoNormS0(num_groups=4), functools.partial(bnnx.EvoNormS0, 8, num_groups=4)),
        (
            bnn.EvoNormB0(use_running_average=False),
            functools.partial(bnnx.EvoNormB0, 8),
        ),
    ],
    ids=["frn", "evonorm_s0", "evonorm_b0"],
)
def test_nnx_equals_linen_with_the_same_params(linen_module, nnx_module):
    variables = _random_params(linen_module.init(jax.random.key(0), X))
    y_linen, updates = linen_module.apply(variables, X, mutable=["batch_stats"])
    layer = nnx_module(rngs=nnx.Rngs(0))
    for name, value in variables["params"].items():
        getattr(layer, name)[...] = value
    chex.assert_trees_all_close(layer(X), y_linen, atol=1e-6)
    if "batch_stats" in updates:  # EvoNormB0: the running variance, then evaluation
        chex.assert_trees_all_close(layer.var[...], updates["batch_stats"]["var"])
        layer.eval()
        evaluation = linen_module.clone(use_running_average=True)
        y_eval = evaluation.apply({**variables, **updates}, X)
        chex.assert_trees_all_close(layer(X), y_eval, atol=1e-6)
        assert sorted(nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))) == ["var"]


@pytest.mark.parametrize("norm", ["frn", "evonorm_b0", "evonorm_s0"])
def test_models_apply_no_relu_after_a_norm_with_its_own_activation(norm):
    factory = models.norm_factory(norm, spatial=True, groups=4)
    assert models.norms.includes_activation(factory)
    assert not models.norms.includes_activation(models.norm_factory("batch", spatial=True))
    # A negative bias makes the layers' outputs negative somewhere: a ReLU after them would
    # make every feature of the small CNN >= 0.
    options = {"bias_init": nn.initializers.constant(-3.0)}
    if norm == "frn":  # the TLU's floor, below the outputs
        options["threshold_init"] = nn.initializers.constant(-5.0)
    model = models.SmallCNN(features=(8,), norm=norm, norm_groups=4, norm_options=options)
    variables = model.init(jax.random.key(0), X, train=False)
    _, sown = model.apply(variables, X, train=False, mutable=["intermediates"])
    assert float(jnp.min(sown["intermediates"]["features"][0])) < 0.0
    # ResNet blocks: norm1 has its activation; norm2 and the shortcut norm, which the
    # residual addition follows, have none.
    params = models.resnet20(norm=norm, norm_groups=4).init(jax.random.key(0), X, train=False)
    block = params["params"]["stage1_block0"]
    name = "threshold" if norm == "frn" else "v"
    assert name in block["norm1"] and name in params["params"]["stem_norm"]
    assert name not in block["norm2"] and name not in block["shortcut_norm"]


def test_recalibrate_sets_the_b0_running_variance_to_the_population_variance():
    model = models.SmallCNN(features=(4,), norm="evonorm_b0")
    variables = model.init(jax.random.key(1), X[:2], train=False)
    conv_input = nn.Conv(4, (3, 3), use_bias=False).apply(
        {"params": variables["params"]["conv0"]}, X
    )
    expected = np.asarray(conv_input, np.float64).var(axis=(0, 1, 2))
    for mode in ("train", "full_batch"):
        new = lifecycle.recalibrate(
            model, variables, [X[:4], X[4:]], mode=mode, apply_kwargs={"train": False}
        )
        np.testing.assert_allclose(new["batch_stats"]["norm0"]["var"], expected, rtol=1e-5)
        assert sorted(new["batch_stats"]["norm0"]) == ["var"]
    net = nnx.Sequential(bnnx.EvoNormB0(8, rngs=nnx.Rngs(0)))
    lifecycle.recalibrate_nnx(net, [X[:4], X[4:]])
    np.testing.assert_allclose(
        net.layers[0].var[...], np.asarray(X, np.float64).var((0, 1, 2)), rtol=1e-5
    )


@pytest.mark.parametrize("norm", ["frn", "evonorm_b0", "evonorm_s0"])
def test_fold_model_keeps_them_as_they_are_and_reports_them(norm):
    model = models.SmallCNN(features=(8,), norm=norm, norm_groups=4)
    variables = model.init(jax.random.key(0), X, train=False)
    if norm == "evonorm_b0":  # a running variance that is not the initial 1
        _, updates = model.apply(variables, X, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    folded = lifecycle.fold_model(model, variables, X, train=True)  # norms forced to eval
    assert folded.plan.pairs == {} and list(folded.plan.kept) == [("norm0",)]
    assert "kept as it is" in folded.plan.format()
    chex.assert_trees_all_close(folded(X), model.apply(variables, X, train=False), atol=1e-6)
    # nnx: the same, and the model itself is left in its mode.
    layer = {
        "frn": bnnx.FilterResponseNorm(8, rngs=nnx.Rngs(0)),
        "evonorm_b0": bnnx.EvoNormB0(8, rngs=nnx.Rngs(0)),
        "evonorm_s0": bnnx.EvoNormS0(8, num_groups=4, rngs=nnx.Rngs(0)),
    }[norm]
    net = nnx.Sequential(nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(1)), layer)
    folded = lifecycle.fold_model(net, X)
    assert list(folded.plan.kept) == [("layers", 1)]
    chex.assert_trees_all_close(folded(X), folded.evaluate(X), atol=1e-6)
    net.eval()
    chex.assert_trees_all_close(folded(X), net(X), atol=1e-6)


def test_functional_states_recalibrate_and_reset():
    def layer_inputs(states, batch, training):
        return {"b0": batch}

    states = {"b0": bnjax.evonorm_b0_state(8)}
    new = lifecycle.recalibrate_states(layer_inputs, states, [X[:4], X[4:]])
    np.testing.assert_allclose(new["b0"].var, np.asarray(X, np.float64).var((0, 1, 2)), rtol=1e-5)
    assert int(new["b0"].count) == 2
    reset = lifecycle.reset_statistics(new)["b0"]
    chex.assert_trees_all_equal(reset, bnjax.evonorm_b0_state(8))
