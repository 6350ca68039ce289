"""The documentation's code stays true: docstring examples and the README's renorm snippet."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax

# Every module whose docstrings carry examples; one runner, so each example runs once.
MODULES = [
    "bnjax",
    "bnjax.core.batch_norm",
    "bnjax.core.batch_renorm",
    "bnjax.core.group_norm",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.parallel",
    "bnjax.models.mlp",
    "bnjax.models.cnn",
    "bnjax.models.resnet",
    "bnjax.diagnostics",
    "bnjax.lifecycle._backends",
    "bnjax.lifecycle.folding",
    "bnjax.lifecycle.freezing",
    "bnjax.lifecycle.population",
    "bnjax.lifecycle.validation",
    "bnjax.data",
    "bnjax.data.composition",
    "bnjax.data.dataset",
    "bnjax.data.digits",
    "bnjax.data.grain_pipeline",
    "bnjax.data.pipeline",
    "bnjax.data.samplers",
    "bnjax.data.sharding",
    "bnjax.data.synthetic",
]
NAMES = {"jax": jax, "jnp": jnp, "np": np, "nn": nn, "nnx": nnx, "bnjax": bnjax}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name == "bnjax.data.grain_pipeline":
        pytest.importorskip("grain.python")
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs=NAMES, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_readme_snippets_run():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 64))
    scale, bias = jnp.ones(64), jnp.zeros(64)
    state = bnjax.batch_norm_state(64)
    y, state = bnjax.batch_norm(x, state, scale, bias, training=True)
    y, _ = bnjax.batch_norm(x, state, scale, bias, training=False)
    y = bnjax.group_norm(x, scale, bias, num_groups=32)
    state = bnjax.batch_renorm_state(64)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True)
    schedule = bnjax.RenormSchedule(warmup_steps=500, r_relax_steps=3_500, d_relax_steps=2_000)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True, schedule=schedule)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True, r_max=3.0, d_max=5.0)
    y, _ = bnjax.batch_renorm(x, state, scale, bias, training=False)
    assert y.shape == x.shape and int(state.step) == 3
    # The README's PyTorch translation: BatchNorm2d(C, momentum=0.1) on NCHW.
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    _, torch_like = bnjax.batch_norm(
        nchw, bnjax.batch_norm_state(64), training=True, momentum=0.9, axis=1,
        use_unbiased_running_var=True,
    )  # fmt: skip
    assert torch_like.var.shape == (64,)


def test_readme_models_snippet_runs():
    from bnjax import models

    images = jnp.ones((2, 8, 8, 3))
    model = models.resnet20(num_classes=10, norm="batch", zero_init_residual=True)
    variables = model.init(jax.random.key(0), images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and "batch_stats" in updates
