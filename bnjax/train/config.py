"""Checks a training config before anything is built, naming the offending key.

A run that would fail after a minute of data loading and compilation fails here, at once, with
``config.<key>=<value>`` and what would work instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnjax.data import DATASETS, GROUPINGS, SAMPLERS
from bnjax.models import BATCH_STATISTICS_NORMS, CONVS, DENSE_MODELS, MODELS, NORMS, layer_widths
from bnjax.train.averaged_model import EMA_STATISTICS
from bnjax.train.defaults import DESCRIPTIONS
from bnjax.train.optim import OPTIMIZERS, SCHEDULES

PARALLEL_MODES = ("jit", "shard_map", "pmap")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
    "dataset": (lambda v: v in DATASETS, f"one of {tuple(DATASETS)}"),
    "sampler": (lambda v: v in SAMPLERS, f"one of {tuple(SAMPLERS)}"),
    "sampler_groups": (lambda v: v in GROUPINGS, f"one of {tuple(GROUPINGS)}"),
    "skew": (lambda v: _non_negative_number(v) and v <= 1, "a number in [0, 1]"),
    "model": (lambda v: v in MODELS, f"one of {tuple(MODELS)}"),
    "model_features": (
        lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(map(_positive_int, v)),
        "a non-empty tuple of positive layer widths, e.g. (32, 64)",
    ),
    "norm": (lambda v: v in NORMS, f"one of {tuple(NORMS)}"),
    "norm_groups": (_positive_int, "a positive int dividing every layer's channels"),
    "bn_momentum": (lambda v: _non_negative_number(v) and v <= 1, "a decay in [0, 1]"),
    "batch_size": (_positive_int, "a positive int"),
    "eval_batch_size": (_positive_int, "a positive int"),
    "num_steps": (_positive_int, "a positive int"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {tuple(OPTIMIZERS)}"),
    "learning_rate": (lambda v: _non_negative_number(v) and v > 0, "a positive number"),
    "momentum": (lambda v: _non_negative_number(v) and v < 1, "a number in [0, 1)"),
    "weight_decay": (_non_negative_number, "a non-negative number"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {tuple(SCHEDULES)}"),
    "warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
    "mixed_precision": (lambda v: isinstance(v, bool), "True or False"),
    "parallel": (lambda v: v in PARALLEL_MODES, f"one of {PARALLEL_MODES}"),
    "log_every": (_positive_int, "a positive int"),
    "eval_every": (_positive_int, "a positive int"),
    "checkpoint_every": (_positive_int, "a positive int"),
    "keep_checkpoints": (_positive_int, "a positive int"),
}

# Keys that may be None (unset) and otherwise must pass their rule.
_OPTIONAL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    name: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, what)
    for name, what in [
        ("renorm_warmup_steps", "a non-negative int, or None for num_steps // 10"),
        ("renorm_r_relax_steps", "a non-negative int, or None for num_steps // 2"),
        ("renorm_d_relax_steps", "a non-negative int, or None for 3 * num_steps // 10"),
    ]
}


def check_config(config, num_devices: int) -> None:
    """Raises ValueError naming `config.<key>` for a missing or invalid setting.

    Args:
      config: an ml_collections.ConfigDict (or any mapping with attribute access) holding at
        least the keys in `_RULES`.
      num_devices: devices the batch is split over (the global batch must divide evenly).
    """
    unknown = sorted(set(config) - set(DESCRIPTIONS))
    if unknown:
        raise ValueError(
            f"config.{unknown[0]} is not a training setting; the keys are "
            f"{', '.join(DESCRIPTIONS)} (scripts/train.py --help says what each means)."
        )
    for key, (valid, expected) in _RULES.items():
        if key not in config:
            raise ValueError(f"config.{key} is missing; expected {expected}.")
        value = config[key]
        if not valid(value):
            raise ValueError(f"config.{key}={value!r} is invalid; expected {expected}.")
    for key, (valid, expected) in _OPTIONAL_RULES.items():
        value = config.get(key)
        if value is not None and not valid(value):
            raise ValueError(f"config.{key}={value!r} is invalid; expected {expected}.")
    _check_conv(config)
    _check_ema(config)
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
    if ghost is not None and config.norm == "evonorm_b0":
        raise ValueError(
            "config.ghost_batch_size applies to batch norm; config.norm='evonorm_b0' takes its "
            "batch variance over the whole (synchronised) batch: leave ghost_batch_size None."
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
    if config.model == "mlp" and config.norm == "cross_iteration":
        raise ValueError("config.norm='cross_iteration' is fused with a conv; the mlp has none.")
    if config.norm == "cross_iteration" and config.ghost_batch_size is not None:
        raise ValueError(
            "config.ghost_batch_size must be None with config.norm='cross_iteration' (its "
            "statistics pool whole batches over steps, not ghost batches)."
        )
    if config.norm == "group":
        _check_groups(config)
    if config.norm in BATCH_STATISTICS_NORMS and config.eval_batch_size < 2:
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size}: the batch-statistics evaluation "
            f"of config.norm={config.norm!r} normalizes each held-out batch with its own "
            "statistics, which one example cannot give; use config.eval_batch_size >= 2."
        )


def _check_conv(config) -> None:
    """config.conv: a name of CONVS ('plain' when absent: configs saved before the key)."""
    conv = config.get("conv", "plain")
    if conv not in CONVS:
        raise ValueError(f"config.conv={conv!r} is invalid; expected one of {tuple(CONVS)}.")
    if conv != "plain" and config.model in DENSE_MODELS:
        raise ValueError(
            f"config.conv={conv!r} needs convolutions; config.model={config.model!r} has none "
            f"(use 'small_cnn', 'resnet20' or 'resnet18', or config.conv='plain')."
        )


def _check_ema(config) -> None:
    """The averaged model's keys (absent in configs saved before them: off)."""
    decay = config.get("ema_decay", 0.0)
    if not _non_negative_number(decay) or decay >= 1:
        raise ValueError(
            f"config.ema_decay={decay!r} is invalid; expected a decay in [0, 1) (0: no averaged "
            "model; e.g. 0.99)."
        )
    statistics = config.get("ema_statistics", "average")
    if statistics not in EMA_STATISTICS:
        raise ValueError(
            f"config.ema_statistics={statistics!r} is invalid; expected one of {EMA_STATISTICS}."
        )
    batches = config.get("ema_recalibration_batches", 8)
    if not _positive_int(batches):
        raise ValueError(
            f"config.ema_recalibration_batches={batches!r} is invalid; expected a positive int."
        )


def _check_groups(config) -> None:
    """Group norm needs config.norm_groups to divide every width, into groups of >= 2 values."""
    widths = layer_widths(config.model, config.model_features)
    groups = config.norm_groups
    # Without spatial axes (the mlp) a group of one channel holds one value per example.
    smallest_group = 2 if config.model == "mlp" else 1
    bad = [w for w in widths if w % groups or w // groups < smallest_group]
    if bad:
        raise ValueError(
            f"config.norm_groups={groups} does not fit the layer widths {widths} of "
            f"config.model={config.model!r}: each width must split into {groups} groups of at "
            f"least {smallest_group} channel(s); {bad} do not. Pick a divisor of every width."
        )
