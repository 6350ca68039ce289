"""fold: the norm-free model with folded params equals the original in evaluation mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import lifecycle
from tests.lifecycle.helpers import DATA, MODELS, apply, initialised


def _assert_same_outputs(model, variables, plain, folded, x):
    reference = apply(model, variables, x, train=False)
    output = apply(plain, folded, x, train=False)
    np.testing.assert_allclose(
        output, reference, rtol=0, atol=2e-5 * float(np.abs(reference).max())
    )


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "resnet18"])
def test_folded_model_equals_the_unfolded_one_in_evaluation(name):
    model, variables = initialised(name)
    folded = lifecycle.fold(variables)
    plain = MODELS[name](norm="none")
    expected = jax.eval_shape(lambda: plain.init(jax.random.key(0), DATA[:2], train=False))
    assert jax.tree.map(jnp.shape, folded) == jax.tree.map(lambda s: s.shape, expected)
    _assert_same_outputs(model, variables, plain, folded, DATA[:8])


def test_epsilon_is_read_from_the_modules():
    _, variables = initialised("cnn")
    model = MODELS["cnn"](norm_options={"epsilon": 0.3})
    epsilons = lifecycle.layer_epsilons(model, variables, DATA[:2], train=False)
    assert epsilons == {("norm0",): 0.3, ("norm1",): 0.3}
    plain = MODELS["cnn"](norm="none")
    _assert_same_outputs(
        model, variables, plain, lifecycle.fold(variables, epsilon=epsilons), DATA[:8]
    )
    with pytest.raises(AssertionError):  # the default 1e-5 is the wrong epsilon here
        _assert_same_outputs(model, variables, plain, lifecycle.fold(variables), DATA[:8])


def test_explicit_pairs_and_unpaired_norms():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(3, name="proj")(x)
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            return nn.BatchNorm(use_running_average=not train, name="after_add")(x + 1.0)

    x = DATA.reshape(-1, 4)[:8]
    variables = Net().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="bn"):
        lifecycle.fold(variables)
    with pytest.raises(ValueError, match="after_add"):
        lifecycle.fold(variables, pairs={"bn": "proj"})
    only_bn = {**variables, "batch_stats": {"bn": variables["batch_stats"]["bn"]}}
    folded = lifecycle.fold(only_bn, pairs={"bn": "proj"})
    assert set(folded["params"]) == {"proj", "after_add"}
    assert set(folded["params"]["proj"]) == {"kernel", "bias"}


def test_fold_into_a_layer_with_a_bias():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    bias, mean = jnp.arange(4.0), jnp.array([1.0, -1.0, 0.5, 2.0])
    var, scale, shift = jnp.array([0.5, 2.0, 1.0, 4.0]), jnp.full(4, 1.5), jnp.ones(4)
    x = DATA[:2, :, :, :2] - 20.0
    conv = nn.Conv(4, (3, 3))
    y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    expected = (y - mean) / jnp.sqrt(var + 1e-3) * scale + shift
    new_kernel, new_bias = lifecycle.fold_into(kernel, bias, mean, var, scale, shift, epsilon=1e-3)
    folded = conv.apply({"params": {"kernel": new_kernel, "bias": new_bias}}, x)
    np.testing.assert_allclose(folded, expected, atol=1e-5)
    with pytest.raises(ValueError, match="output"):
        lifecycle.fold_into(kernel, None, jnp.zeros(3), jnp.ones(3))
