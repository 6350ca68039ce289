"""The bundled models: every norm in both modes, the field's conventions, sizes, round trips."""

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnjax import models

IMAGES = jax.random.normal(jax.random.key(0), (4, 16, 16, 3)) * 2.0 + 0.5


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("norm", tuple(models.NORMS))
def test_resnet20_forward_in_both_modes_with_every_norm(norm):
    model = models.resnet20(num_classes=10, norm=norm)
    variables = model.init(jax.random.key(1), IMAGES, train=False)
    logits, updates = model.apply(
        variables, IMAGES, train=True, mutable=["batch_stats", "intermediates"]
    )
    eval_logits = model.apply(variables, IMAGES, train=False)
    assert logits.shape == eval_logits.shape == (4, 10)
    assert bool(jnp.all(jnp.isfinite(logits))) and bool(jnp.all(jnp.isfinite(eval_logits)))
    assert updates["intermediates"]["features"][0].shape == (4, 64)
    if norm in models.BATCH_STATISTICS_NORMS:
        # Training mode normalizes with batch statistics and moves the running ones.
        assert not np.allclose(logits, eval_logits)
        # 'var', which every such norm keeps (a moving-average batch norm keeps its mean at 0
        # in its reduced form; EvoNorm-B0 keeps no mean).
        before = variables["batch_stats"]["stem_norm"]["var"]
        assert not np.allclose(updates["batch_stats"]["stem_norm"]["var"], before)
    else:
        # No batch statistics: the two modes are one function, and there is no state.
        chex.assert_trees_all_close(logits, eval_logits, atol=1e-5)
        assert "batch_stats" not in variables


def test_parameter_counts_match_the_reference_architectures():
    def count(model):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))
        return _count(shapes["params"])

    # He et al. (2016): ResNet-20 has 0.27M parameters; 272,474 with BN and a 10-way head.
    assert count(models.resnet20(num_classes=10)) == 272_474
    # The common CIFAR ResNet-18 (3x3 stem, no max-pool, BN, no conv bias): 11,173,962.
    assert count(models.resnet18(num_classes=10)) == 11_173_962


def test_convs_have_a_bias_only_without_a_norm():
    def conv_biases(norm):
        variables = models.SmallCNN(features=(8,), norm=norm).init(
            jax.random.key(0), IMAGES, train=False
        )
        return "bias" in variables["params"]["conv0"]

    assert not conv_biases("batch") and not conv_biases("group")
    assert conv_biases("none")


def test_zero_init_residual_starts_each_block_as_identity_branch():
    model = models.resnet20(norm="batch", zero_init_residual=True)
    params = model.init(jax.random.key(0), IMAGES, train=False)["params"]
    for name, block in params.items():
        if name.startswith("stage"):
            chex.assert_trees_all_equal(
                block["norm2"]["scale"], jnp.zeros_like(block["norm2"]["scale"])
            )
            assert bool(jnp.all(block["norm1"]["scale"] == 1))


def test_mlp_and_cnn_shapes_and_mode_switch():
    for model in (models.MLP(features=(16, 16)), models.SmallCNN(features=(8, 16))):
        variables = model.init(jax.random.key(0), IMAGES, train=False)
        logits, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
        assert logits.shape == (4, 10)
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )


def test_bad_norm_choices_are_named():
    with pytest.raises(ValueError, match="`norm`='batchnorm' is not one of"):
        models.resnet20(norm="batchnorm").init(jax.random.key(0), IMAGES, train=False)
    with pytest.raises(ValueError, match="'instance' needs spatial axes"):
        models.MLP(norm="instance").init(jax.random.key(0), IMAGES, train=False)


def test_variables_round_trip_through_flax_serialization_and_orbax(tmp_path):
    model = models.resnet20(norm="batch")
    variables = model.init(jax.random.key(0), IMAGES, train=False)
    _, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
    chex.assert_trees_all_equal(restored, variables)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "variables", variables)
    checkpointer.wait_until_finished()
    loaded = checkpointer.restore(tmp_path / "variables", variables)
    chex.assert_trees_all_equal(loaded, variables)
    chex.assert_trees_all_close(
        model.apply(loaded, IMAGES, train=False), model.apply(variables, IMAGES, train=False)
    )


def test_the_model_registry_builds_each_name_and_refuses_others():
    for name, (constructor, takes_widths) in models.MODELS.items():
        built = models.build_model(name, features=(8,) if takes_widths else None, norm="layer")
        assert built.norm == "layer" and isinstance(built, type(constructor())), name
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; the models are 'mlp'"):
        models.build_model("resnet50")
    with pytest.raises(ValueError, match="has fixed layer widths"):
        models.build_model("resnet20", features=(8,))
