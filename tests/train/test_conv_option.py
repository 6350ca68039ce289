"""The `conv` option: the models build each conv of CONVS, config.conv is validated, the loop
trains GN + WS and BN + centered convs, and workdirs saved before the key still resume."""

from __future__ import annotations

import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import linen as bl
from bnjax import models
from bnjax.train import loop, steps
from bnjax.train.workdir import CONFIG_FILE, config_changes
from tests.train.helpers import final_state, tiny_config

IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)


def _conv_classes(model, variables):
    """{module path: class} of every Conv the model calls (read by intercepting calls)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            seen[tuple(context.module.path)] = type(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, IMAGES, train=False), variables)
    return seen


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
@pytest.mark.parametrize("conv", tuple(models.CONVS))
def test_every_conv_model_builds_every_conv(name, conv):
    model = models.build_model(
        name, features=(8,) if name == "small_cnn" else None, norm="group", conv=conv
    )
    plain = models.build_model(name, features=(8,) if name == "small_cnn" else None, norm="group")

    def init(model):  # shapes only: nothing is computed
        return jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))

    variables = init(model)
    # The same variables as the plain model: a checkpoint fits every conv.
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, init(plain))
    classes = set(_conv_classes(model, variables).values())
    assert classes == {models.CONVS[conv]}


def test_resnet_convolves_with_standardized_kernels():
    # Two stages: stem, blocks and a projection shortcut, every conv standardized.
    shape = dict(stage_sizes=(1, 1), stage_features=(8, 16), norm="none")
    model, plain = models.ResNet(**shape, conv="standardized"), models.ResNet(**shape)
    # Random values of the variables' shapes (a jitted He init compiles slowly on CPU).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), IMAGES, train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)

    def standardize_kernels(variables):
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                bnjax.standardize_weight(leaf)
                if path[-1].key == "kernel" and leaf.ndim == 4
                else leaf
            ),
            variables,
        )

    @jax.jit
    def both(variables):
        ours = model.apply(variables, IMAGES, train=False)
        return ours, plain.apply(standardize_kernels(variables), IMAGES, train=False)

    ours, expected = both(variables)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_conv_factories_and_errors():
    model = models.build_model("small_cnn", features=(8,), conv=bl.CenteredConv)
    variables = model.init(jax.random.key(2), IMAGES, train=False)
    assert set(_conv_classes(model, variables).values()) == {bl.CenteredConv}
    with pytest.raises(ValueError, match="unknown `conv` 'weight_std'; the convs are 'plain'"):
        models.build_model("small_cnn", conv="weight_std")
    with pytest.raises(ValueError, match="model 'mlp' has no convolution"):
        models.build_model("mlp", conv="standardized")
    assert isinstance(models.build_model("mlp", conv="plain"), models.MLP)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (dict(conv="weight_std"), r"config.conv='weight_std' is invalid; expected one of"),
        (dict(conv="standardized", model="mlp"), r"config.conv='standardized' needs convolutions"),
    ],
)
def test_invalid_conv_configs_fail_fast(tmp_path, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        loop.train_and_evaluate(tiny_config(**override), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_make_model_passes_conv():
    model = steps.make_model("small_cnn", num_classes=3, features=(8,), conv="standardized")
    assert model.conv == "standardized"
    assert loop.model_settings(tiny_config(conv="centered"), 3)["conv"] == "centered"


@pytest.mark.parametrize(
    ("norm", "conv"),
    [("group", "standardized"), pytest.param("batch", "centered", marks=pytest.mark.slow)],
)
def test_the_loop_trains_with_a_conv(tmp_path, norm, conv):
    config = tiny_config(norm=norm, conv=conv, num_steps=4, eval_every=4, norm_groups=4)
    final = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(final["eval/accuracy_running_stats"])
    step, state = final_state(tmp_path)
    assert step == 4 and ("batch_stats" in state) == (norm == "batch")
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["conv"] == conv


def test_a_workdir_saved_without_the_conv_key_resumes(tmp_path):
    config = tiny_config(num_steps=4, eval_every=4)
    loop.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    del saved["conv"]  # as written before the key existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    before = final_state(tmp_path)
    loop.train_and_evaluate(tiny_config(num_steps=4, eval_every=4), str(tmp_path))
    chex.assert_trees_all_equal(final_state(tmp_path), before)
    # Resuming such a run with another conv is a change, refused like any other.
    assert config_changes(saved, {**saved, "conv": "standardized"})[0] == [
        "config.conv: 'plain' -> 'standardized'"
    ]
    assert config_changes(saved, {**saved, "conv": "plain"}) == ([], [])
