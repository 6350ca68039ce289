"""Shared data and models for the lifecycle tests.

Variables are drawn with NumPy into the shapes ``jax.eval_shape(model.init)`` gives, so no test
pays for compiling an ``init`` (seconds for a ResNet on a 2-core machine): kernels scaled by
1/sqrt(fan-in), scale and bias away from 1 and 0, running statistics away from 0 and 1, and
(with ``counters=True``: norms built with ``track_counters=True``) 'count' at 1 and 'skipped' at
0 in each layer's 'batch_stats', as after one training step.
"""

import functools

import jax
import numpy as np

from bnjax import models

# Far from zero mean and unit variance, so a wrong formula or a lost digit shows.
DATA = np.asarray(jax.random.normal(jax.random.key(0), (96, 6, 6, 2))) * 3.0 + 20.0
BATCHES = [DATA[i : i + 16] for i in range(0, 96, 16)]

MODELS = {
    "mlp": lambda **options: models.MLP(features=(8, 8), **options),
    "cnn": lambda **options: models.SmallCNN(features=(4, 8), **options),
    "resnet": lambda **options: models.ResNet(
        stage_sizes=(1, 1), stage_features=(4, 8), num_classes=4, **options
    ),
    "resnet20": lambda **options: models.resnet20(num_classes=4, **options),
    "resnet18": lambda **options: models.resnet18(num_classes=4, **options),
}


def _draw(path, shape, rng):
    name = path[-1].key
    if name == "kernel":
        return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
        return rng.uniform(0.5, 2.0, size=shape)
    if name in ("bias", "mean"):
        return rng.normal(size=shape) * (2.0 if name == "mean" else 0.3)
    return np.ones(shape) if name == "count" else np.zeros(shape)  # as after one step


@functools.cache
def initialised(name: str, norm: str = "batch", counters: bool = False):
    """(model, variables) of a bundled model for inputs shaped like DATA; with `counters` its
    norms keep 'count' and 'skipped' (``track_counters=True``) in 'batch_stats'."""
    options = {"norm_options": {"track_counters": True}} if counters else {}
    model = MODELS[name](norm=norm, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), DATA[:2], train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: np.asarray(_draw(path, s.shape, rng), s.dtype), shapes
    )
    return model, jax.tree.map(jax.numpy.asarray, variables)


def apply(model, variables, x, **kwargs):
    """model.apply, compiled (eager application dispatches op by op)."""
    return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)
