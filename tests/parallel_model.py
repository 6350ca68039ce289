"""A small conv net with batch norm and its training step, in plain JAX, for the parallel tests.

Shared by tests/test_parallel.py and the multi-host worker (tests/multihost_worker.py), so both
train exactly the same model. conv3x3 -> BN -> relu, twice, global average pool, dense head;
SGD with momentum. Nothing here touches a device at import time (the worker must call
jax.distributed.initialize first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bnjax
from bnjax import parallel

IMAGE = (6, 6, 3)
CHANNELS = (8, 8)
CLASSES = 4
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def init_state(seed: int = 0) -> dict:
    """{'params', 'opt_state', 'bn_state'}: the whole training state as one pytree.

    Drawn with NumPy: XLA:CPU takes seconds to compile jax.random's initialisers, in every
    process of the multi-host test.
    """
    rng = np.random.default_rng(seed)

    def normal(shape, scale=1.0, shift=0.0):
        return jnp.asarray(rng.normal(size=shape) * scale + shift, jnp.float32)

    params, bn_state = {}, {}
    fan_in = IMAGE[-1]
    for layer, channels in enumerate(CHANNELS):
        params[f"conv{layer}"] = normal((3, 3, fan_in, channels), 1 / np.sqrt(9 * fan_in))
        params[f"bn{layer}"] = {
            "scale": normal((channels,), 0.1, 1.0),
            "bias": normal((channels,), 0.1),
        }
        bn_state[f"bn{layer}"] = bnjax.batch_norm_state(channels)
        fan_in = channels
    params["head"] = {
        "kernel": normal((fan_in, CLASSES), 1 / np.sqrt(fan_in)),
        "bias": jnp.zeros((CLASSES,)),
    }
    return {"params": params, "opt_state": OPTIMIZER.init(params), "bn_state": bn_state}


def batches(num_steps: int, batch_size: int, seed: int = 1) -> list[dict]:
    """Global batches as NumPy arrays (identical on every process): images and labels."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": (rng.normal(size=(batch_size, *IMAGE)) * 2.0 + 0.5).astype(np.float32),
            "label": rng.integers(0, CLASSES, size=(batch_size,)).astype(np.int32),
        }
        for _ in range(num_steps)
    ]


def forward(params, bn_state, images, **bn_options):
    """Logits and the new batch-norm state (training mode); bn_options go to batch_norm."""
    hidden = images
    new_state = {}
    for layer in range(len(CHANNELS)):
        hidden = lax.conv_general_dilated(
            hidden,
            params[f"conv{layer}"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        name = f"bn{layer}"
        hidden, new_state[name] = bnjax.batch_norm(
            hidden,
            bn_state[name],
            params[name]["scale"],
            params[name]["bias"],
            training=True,
            momentum=0.9,
            **bn_options,
        )
        hidden = jax.nn.relu(hidden)
    pooled = hidden.mean(axis=(1, 2))
    return pooled @ params["head"]["kernel"] + params["head"]["bias"], new_state


def make_step(*, sync: bool | str = True, **bn_options):
    """A per-device training step `step(state, batch, axis_name)` for every parallel mode.

    Gradients are always averaged over `axis_name` (all data-parallel devices). Batch norm
    syncs its statistics over `axis_name` when `sync` is True, over the named mesh axis when
    `sync` is a str (sub-groups), and not at all (local statistics) when it is False.
    """

    def step(state, batch, axis_name):
        bn_axis = (
            None if axis_name is None or sync is False else (axis_name if sync is True else sync)
        )

        def loss_fn(params):
            logits, bn_state = forward(
                params, state["bn_state"], batch["image"], axis_name=bn_axis, **bn_options
            )
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return losses.mean(), bn_state

        value_and_grad = parallel.data_parallel_value_and_grad(loss_fn, axis_name, has_aux=True)
        (loss, bn_state), grads = value_and_grad(state["params"])
        updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "bn_state": bn_state}, {"loss": loss}

    return step


def flatten(tree) -> dict[str, np.ndarray]:
    """{'params/conv0': array, ...}: a state as flat NumPy arrays (for .npz files)."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
