"""The conv + cross-iteration batch norm modules (linen, nnx), the models, the lifecycle tools."""

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

X = [jax.random.normal(jax.random.key(i), (4, 6, 6, 3)) * 2.0 + 1.0 for i in range(4)]


def _train(module, variables, xs, **kwargs):
    outputs = []
    for x in xs:
        y, updates = module.apply(variables, x, mutable=["batch_stats"], **kwargs)
        variables = {**variables, **updates}
        outputs.append(y)
    return outputs, variables


def test_window_one_is_flax_conv_then_batch_norm():
    fused = bnn.CrossIterationConvBatchNorm(
        5, (3, 3), strides=2, window=1, momentum=0.8, use_running_average=False
    )
    variables = fused.init(jax.random.key(0), X[0])
    kernel = variables["params"]["kernel"]
    conv = nn.Conv(5, (3, 3), strides=2, use_bias=False)
    bn = bnn.BatchNorm(momentum=0.8, use_running_average=False)
    bn_variables = bn.init(jax.random.key(0), conv.apply({"params": {"kernel": kernel}}, X[0]))
    outputs, variables = _train(fused, variables, X[:3])
    for x, y in zip(X[:3], outputs, strict=True):
        h = conv.apply({"params": {"kernel": kernel}}, x)
        want, updates = bn.apply(bn_variables, h, mutable=["batch_stats"])
        bn_variables = {**bn_variables, **updates}
        chex.assert_trees_all_close(y, want, atol=1e-5)
    for name in ("mean", "var"):
        chex.assert_trees_all_close(
            variables["batch_stats"][name], bn_variables["batch_stats"][name], atol=1e-6
        )
    # Evaluation: batch norm's, with the running statistics.
    h = conv.apply({"params": {"kernel": kernel}}, X[3])
    chex.assert_trees_all_close(
        fused.clone(use_running_average=True).apply(variables, X[3]),
        bn.clone(use_running_average=True).apply(bn_variables, h),
        atol=1e-5,
    )


def test_linen_and_nnx_give_the_same_steps():
    linen_layer = bnn.CrossIterationConvBatchNorm(
        4, (3, 3), window=3, burn_in=1, use_running_average=False
    )
    variables = linen_layer.init(jax.random.key(0), X[0])
    nnx_layer = bnnx.CrossIterationConvBatchNorm(
        3, 4, (3, 3), window=3, burn_in=1, rngs=nnx.Rngs(0)
    )
    nnx_layer.kernel[...] = variables["params"]["kernel"]
    params = variables["params"]
    for x in X:
        # A gradient step between iterations, so the Taylor terms matter.
        y, updates = linen_layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        chex.assert_trees_all_close(nnx_layer(x), y, atol=1e-5)
        params = {**params, "kernel": params["kernel"] * 1.05}
        nnx_layer.kernel[...] = params["kernel"]
    for name, value in variables["batch_stats"].items():
        chex.assert_trees_all_close(getattr(nnx_layer, name)[...], value, atol=1e-5, rtol=1e-5)
    nnx_layer.eval()
    chex.assert_trees_all_close(
        nnx_layer(X[0]),
        linen_layer.clone(use_running_average=True).apply({**variables, "params": params}, X[0]),
        atol=1e-5,
    )


def test_bfloat16_module_keeps_float32_state():
    layer = bnn.CrossIterationConvBatchNorm(
        4, (3, 3), dtype=jnp.bfloat16, use_running_average=False
    )
    variables = layer.init(jax.random.key(0), X[0])
    outputs, variables = _train(layer, variables, X[:2])
    assert outputs[-1].dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["batch_stats"])} <= {
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }


def test_the_models_build_the_fused_layer_in_place_of_conv_and_norm():
    model = models.SmallCNN(features=(4, 8), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    assert sorted(variables["params"]) == ["head", "norm0", "norm1"]
    assert sorted(variables["params"]["norm0"]) == ["bias", "kernel", "scale"]
    _, updates = model.apply(variables, X[0], train=True, mutable=["batch_stats"])
    assert int(updates["batch_stats"]["norm1"]["step"]) == 1
    resnet = models.resnet20(num_classes=10, norm="cross_iteration", zero_init_residual=True)
    shapes = jax.eval_shape(lambda: resnet.init(jax.random.key(0), X[0], train=False))
    block = shapes["params"]["stage1_block0"]
    assert sorted(block) == ["norm1", "norm2", "shortcut_norm"]
    assert block["shortcut_norm"]["kernel"].shape == (1, 1, 16, 32)
    with pytest.raises(ValueError, match="the mlp has no conv"):
        models.MLP(norm="cross_iteration").init(jax.random.key(0), X[0], train=False)


def test_a_per_example_mask_leaves_padding_out_of_the_statistics():
    model = models.SmallCNN(features=(4,), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    padded = jnp.concatenate([X[0], 100.0 * jnp.ones_like(X[0])])
    keep = jnp.arange(8) < 4
    _, with_padding = model.apply(variables, padded, train=True, mask=keep, mutable=["batch_stats"])
    _, without = model.apply(variables, X[0], train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(with_padding, without, atol=1e-5, rtol=1e-5)


def test_recalibrate_sets_the_population_statistics_of_the_conv_output():
    model = models.SmallCNN(features=(4,), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    _, variables = _train_model(model, variables, X[:2])
    new = lifecycle.recalibrate(model, variables, X, apply_kwargs={"train": False})
    kernel = variables["params"]["norm0"]["kernel"]
    conv = nn.Conv(4, (3, 3), use_bias=False)
    h = jnp.concatenate([conv.apply({"params": {"kernel": kernel}}, x) for x in X])
    stats = new["batch_stats"]["norm0"]
    chex.assert_trees_all_close(stats["mean"], h.mean((0, 1, 2)), atol=1e-5)
    chex.assert_trees_all_close(stats["var"], h.var((0, 1, 2)), rtol=1e-5)
    # The window is the training state; recalibration leaves it as it was.
    chex.assert_trees_all_close(
        stats["past_mean_grad"], variables["batch_stats"]["norm0"]["past_mean_grad"]
    )


def _train_model(model, variables, xs):
    for x in xs:
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return None, variables


def test_folding_refuses_naming_the_layer_and_fold_into_gives_the_evaluation():
    model = models.SmallCNN(features=(4,), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    _, variables = _train_model(model, variables, X[:3])
    for fold in (
        lambda: lifecycle.fold_model(model, variables, X[0], train=False),
        lambda: lifecycle.fold(variables),
    ):
        with pytest.raises(ValueError, match=r"cannot fold norm0.*fold_into"):
            fold()
    params, stats = variables["params"]["norm0"], variables["batch_stats"]["norm0"]
    kernel, bias = lifecycle.fold_into(
        params["kernel"], None, stats["mean"], stats["var"], params["scale"], params["bias"]
    )
    layer = bnn.CrossIterationConvBatchNorm(4, (3, 3), use_running_average=True)
    want = layer.apply({"params": params, "batch_stats": stats}, X[3])
    folded = nn.Conv(4, (3, 3)).apply({"params": {"kernel": kernel, "bias": bias}}, X[3])
    chex.assert_trees_all_close(folded, want, atol=1e-4)


def test_module_errors_name_the_option():
    with pytest.raises(ValueError, match="`features`"):
        bnn.CrossIterationConvBatchNorm(use_running_average=False).init(jax.random.key(0), X[0])
    with pytest.raises(ValueError, match="`feature_group_count`=2 must divide"):
        bnn.CrossIterationConvBatchNorm(
            4, (3, 3), feature_group_count=2, use_running_average=False
        ).init(jax.random.key(0), X[0])
    with pytest.raises(ValueError, match="`padding`='CIRCULAR'"):
        bnn.CrossIterationConvBatchNorm(
            4, (3, 3), padding="CIRCULAR", use_running_average=False
        ).init(jax.random.key(0), X[0])
    with pytest.raises(ValueError, match="2 spatial axes"):
        bnn.CrossIterationConvBatchNorm(4, (3, 3), use_running_average=False).init(
            jax.random.key(0), jnp.ones((4, 3))
        )


def test_running_statistics_feed_on_the_pooled_statistics():
    """After burn-in the running statistics average what the layer normalized with."""
    kernel = jnp.array([[1.0, -1.0], [2.0, 0.5]])
    state = bnjax.cross_iteration_state(kernel.shape, window=2)
    x = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
    _, state = bnjax.cross_iteration_batch_norm(x, kernel, state, training=True, momentum=0.0)
    _, state = bnjax.cross_iteration_batch_norm(2 * x, kernel, state, training=True, momentum=0.0)
    y = np.concatenate([np.asarray(x @ kernel), np.asarray(2 * x @ kernel)])
    # Same kernel: compensation is nothing, the pooled statistics are the two batches' merge.
    np.testing.assert_allclose(state.mean, y.mean(0), rtol=1e-6)
    np.testing.assert_allclose(state.var, y.var(0), rtol=1e-5)


def test_freeze_runs_the_fused_layers_on_their_running_statistics():
    model = models.SmallCNN(features=(4,), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    _, variables = _train_model(model, variables, X[:2])
    logits, updates = lifecycle.freeze(model.apply)(
        variables, X[2], train=True, mutable=["batch_stats"]
    )
    chex.assert_trees_all_close(logits, model.apply(variables, X[2], train=False))
    chex.assert_trees_all_close(updates["batch_stats"], variables["batch_stats"])


def test_nnx_lifecycle_tools_refuse_the_fused_module_naming_it():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.cbn = bnnx.CrossIterationConvBatchNorm(3, 4, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.cbn(x)

    net = Net(nnx.Rngs(0))
    for call in (
        lambda: lifecycle.recalibrate_nnx(net, [X[0]]),
        lambda: lifecycle.fold_model(net, X[0]),
        lambda: lifecycle.freeze(net),
        lambda: lifecycle.reset_statistics(net),
    ):
        with pytest.raises(ValueError, match=r"does not handle the cross-iteration.*cbn"):
            call()


def test_telemetry_reports_the_fused_layers_on_their_conv_output():
    from bnjax import diagnostics

    model = models.SmallCNN(features=(4,), norm="cross_iteration")
    variables = model.init(jax.random.key(0), X[0], train=False)
    with diagnostics.telemetry():
        _, updates = model.apply(
            variables, X[0], train=True, mutable=["batch_stats", diagnostics.COLLECTION]
        )
    (layer,) = updates[diagnostics.COLLECTION]["norm0"]["telemetry"]
    kernel = variables["params"]["norm0"]["kernel"]
    h = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": kernel}}, X[0])
    # Fresh running statistics (mean 0, var 1): the batch variance of the conv output.
    np.testing.assert_allclose(layer.batch_var, h.var((0, 1, 2)).mean(), rtol=1e-5)
