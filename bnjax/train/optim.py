"""Optimizers by name: optax SGD (+ momentum / Nesterov) or AdamW, with a linear warm-up
followed by a constant or cosine learning rate.

Weight decay applies to kernels only: normalization scales and biases keep their role
(decaying them fights the normalization), as is usual for BN networks. With SGD it is added to
the gradient before momentum (PyTorch's `weight_decay`); with AdamW it is decoupled.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax


def _kernels_only(params):
    """True for weight matrices and conv kernels, False for norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def _sgd(learning_rate, momentum, weight_decay, nesterov=False):
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_kernels_only),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def _nesterov(learning_rate, momentum, weight_decay):
    return _sgd(learning_rate, momentum, weight_decay, nesterov=True)


def _adamw(learning_rate, momentum, weight_decay):
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_kernels_only)


# The registries: name -> builder. Their keys are the valid `optimizer` / `schedule` names.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": _sgd,
    "nesterov": _nesterov,
    "adamw": _adamw,
}
SCHEDULES: dict[str, Callable[[float, int], optax.Schedule]] = {
    "constant": lambda learning_rate, steps: optax.constant_schedule(learning_rate),
    "cosine": optax.cosine_decay_schedule,
}


def _check_name(value: str, registry: dict, what: str) -> None:
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; the {what}s are {tuple(registry)}.")


def learning_rate_schedule(
    learning_rate: float, *, num_steps: int, warmup_steps: int = 0, schedule: str = "constant"
) -> optax.Schedule:
    """lr(t): 0 -> `learning_rate` over `warmup_steps`, then `schedule` ('constant', or
    'cosine' down to 0 at `num_steps`)."""
    _check_name(schedule, SCHEDULES, "schedule")
    after = SCHEDULES[schedule](learning_rate, num_steps - warmup_steps)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """The optimizer `name` of `OPTIMIZERS` ('sgd', 'nesterov': SGD with `momentum`; 'adamw')
    at `learning_rate` (a number or a `learning_rate_schedule`); weight decay on kernels only.
    """
    _check_name(name, OPTIMIZERS, "optimizer")
    return OPTIMIZERS[name](learning_rate, momentum, weight_decay)
