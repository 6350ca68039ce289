"""The optimizer of a training config: optax SGD (+ momentum / Nesterov) or AdamW, with a
linear warm-up followed by a constant or cosine learning rate.

Weight decay applies to kernels only: normalization scales and biases keep their role
(decaying them fights the normalization), as is usual for BN networks. With SGD it is added to
the gradient before momentum (PyTorch's `weight_decay`); with AdamW it is decoupled.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """lr(t): 0 -> `learning_rate` over `warmup_steps`, then constant or cosine to 0."""
    decay_steps = config.num_steps - config.warmup_steps
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(config.learning_rate, decay_steps)
    else:
        after = optax.constant_schedule(config.learning_rate)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def _kernels_only(params):
    """True for weight matrices and conv kernels, False for norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """SGD (momentum or Nesterov) or AdamW on `learning_rate_schedule(config)`; weight decay
    on kernels only."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=_kernels_only)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_kernels_only),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.optimizer == "nesterov"),
    )
