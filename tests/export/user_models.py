"""Models a user writes: own layer names, flax's own norms, residual additions, nnx.

None follows the bundled models' naming, so `bnjax.lifecycle.fold` cannot pair them by name;
`fold_model` pairs them from the traced computation. Variables are set away from their
initial values (statistics far from 0 and 1, scales and biases far from 1 and 0) so that a
wrong or missing fold shows in the outputs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnjax import linen as bnn
from bnjax import nnx as bnnx

IMAGES = np.asarray(jax.random.normal(jax.random.key(0), (8, 8, 8, 3))) * 2.0 + 1.0


class TinyResNet(nn.Module):
    """A user's linen ResNet: flax and bnjax norms under its own names, a norm after an add."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="entry")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="entry_bn")(x))
        y = nn.Conv(8, (3, 3), name="body_a")(x)  # with a bias
        y = nn.relu(bnn.BatchNorm(use_running_average=not train, name="body_a_bn")(y))
        y = nn.Conv(8, (3, 3), use_bias=False, name="body_b")(y)
        y = bnn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="body_b_bn")(y)
        x = nn.BatchNorm(use_running_average=not train, name="after_add")(x + y)  # cannot fold
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dense(16, use_bias=False, name="proj")(x)
        x = nn.relu(bnn.BatchNorm(use_running_average=not train, name="proj_bn")(x))
        return nn.Dense(5, name="logits")(x)


class TinyNNX(nnx.Module):
    """A user's nnx network: nnx and bnjax norms, a norm after a pooling."""

    def __init__(self, rngs):
        self.features = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.features_bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.pooled_bn = bnnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.hidden_bn = bnnx.BatchNorm(16, use_running_average=True, epsilon=1e-3, rngs=rngs)
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.features_bn(self.features(x)))
        x = self.pooled_bn(nnx.avg_pool(x, (2, 2), strides=(2, 2)))  # cannot fold
        x = nnx.relu(self.hidden_bn(self.hidden(x.mean(axis=(1, 2)))))
        return self.head(x)


def _away_from_initial(path, value, rng):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("var", "scale"):
        return jnp.asarray(rng.uniform(0.5, 2.0, value.shape), value.dtype)
    if name in ("mean", "bias"):
        return jnp.asarray(rng.normal(size=value.shape), value.dtype)
    return value


def user_linen():
    """(model, variables) of TinyResNet with trained-looking statistics."""
    model = TinyResNet()
    variables = model.init(jax.random.key(1), IMAGES[:2])
    rng = np.random.default_rng(0)
    return model, jax.tree_util.tree_map_with_path(
        lambda path, value: _away_from_initial(path, value, rng), variables
    )


def user_nnx():
    """A TinyNNX with trained-looking statistics, scales and biases."""
    model = TinyNNX(nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for _, module in nnx.iter_modules(model):
        for name in ("mean", "var", "scale", "bias"):
            variable = getattr(module, name, None)
            if isinstance(variable, nnx.Variable):
                variable[...] = _away_from_initial((name,), variable[...], rng)
    return model
