"""Checks a training config before anything is built, naming the offending key.

A run that would fail after a minute of data loading and compilation fails here, at once, with
``config.<key>=<value>`` and what would work instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnjax.data import DATASETS, SAMPLERS
from bnjax.models import NORMS

MODELS = ("mlp", "small_cnn", "resnet20", "resnet18")
OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine")
PARALLEL_MODES = ("jit", "shard_map", "pmap")
GROUPINGS = ("class", "subcluster")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
    "dataset": (lambda v: v in DATASETS, f"one of {DATASETS}"),
    "sampler": (lambda v: v in SAMPLERS, f"one of {SAMPLERS}"),
    "sampler_groups": (lambda v: v in GROUPINGS, f"one of {GROUPINGS}"),
    "skew": (lambda v: _non_negative_number(v) and v <= 1, "a number in [0, 1]"),
    "model": (lambda v: v in MODELS, f"one of {MODELS}"),
    "norm": (lambda v: v in NORMS, f"one of {NORMS}"),
    "norm_groups": (_positive_int, "a positive int dividing every layer's channels"),
    "bn_momentum": (lambda v: _non_negative_number(v) and v <= 1, "a decay in [0, 1]"),
    "batch_size": (_positive_int, "a positive int"),
    "eval_batch_size": (_positive_int, "a positive int"),
    "num_steps": (_positive_int, "a positive int"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS}"),
    "learning_rate": (lambda v: _non_negative_number(v) and v > 0, "a positive number"),
    "momentum": (lambda v: _non_negative_number(v) and v < 1, "a number in [0, 1)"),
    "weight_decay": (_non_negative_number, "a non-negative number"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
    "warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
    "mixed_precision": (lambda v: isinstance(v, bool), "True or False"),
    "parallel": (lambda v: v in PARALLEL_MODES, f"one of {PARALLEL_MODES}"),
    "log_every": (_positive_int, "a positive int"),
    "eval_every": (_positive_int, "a positive int"),
    "checkpoint_every": (_positive_int, "a positive int"),
    "keep_checkpoints": (_positive_int, "a positive int"),
}


def check_config(config, num_devices: int) -> None:
    """Raises ValueError naming `config.<key>` for a missing or invalid setting.

    Args:
      config: an ml_collections.ConfigDict (or any mapping with attribute access) holding at
        least the keys in `_RULES`.
      num_devices: devices the batch is split over (the global batch must divide evenly).
    """
    for key, (valid, expected) in _RULES.items():
        if key not in config:
            raise ValueError(f"config.{key} is missing; expected {expected}.")
        value = config[key]
        if not valid(value):
            raise ValueError(f"config.{key}={value!r} is invalid; expected {expected}.")
    if config.batch_size % num_devices:
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide evenly over the "
            f"{num_devices} devices (config.parallel={config.parallel!r})."
        )
    ghost = config.get("ghost_batch_size")
    if ghost is not None and (not _positive_int(ghost) or config.batch_size % ghost):
        raise ValueError(
            f"config.ghost_batch_size={ghost!r} must be a positive int dividing "
            f"config.batch_size={config.batch_size} (or None)."
        )
    if config.warmup_steps >= config.num_steps:
        raise ValueError(
            f"config.warmup_steps={config.warmup_steps} must be below "
            f"config.num_steps={config.num_steps}."
        )
    if config.sampler_groups == "subcluster" and config.dataset != "clusters":
        raise ValueError(
            f"config.sampler_groups='subcluster' needs built-in sub-clusters "
            f"(config.dataset='clusters'), got config.dataset={config.dataset!r}."
        )
    if config.model == "mlp" and config.norm == "instance":
        raise ValueError("config.norm='instance' needs spatial axes; the mlp has none.")
