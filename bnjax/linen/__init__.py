"""flax.linen modules over the bnjax core: swap ``flax.linen.BatchNorm`` for ``BatchNorm``.

Each module creates its parameters and state, then calls one core function (the math lives
there: `bnjax.batch_norm`, `bnjax.batch_renorm`, `bnjax.group_norm`, `bnjax.layer_norm`,
`bnjax.instance_norm`, `bnjax.rms_norm`). Options keep flax's names, defaults and meanings, and
the variables are exactly flax's (collections, names, shapes, dtypes), so flax checkpoints and
flax training code work unchanged:

- ``'params'``: ``'scale'`` and ``'bias'`` (feature shape, `param_dtype`).
- ``'batch_stats'``: ``'mean'`` and ``'var'`` (feature shape, float32).

Train with ``mutable=['batch_stats']``, as with flax. ``track_counters=True`` adds two int32
scalars to ``'batch_stats'``: ``'count'`` (batches folded into the running statistics) and
``'skipped'`` (training batches whose statistics were not finite and were left out); the same
``mutable=['batch_stats']`` keeps them. ``momentum=None`` (a cumulative average over all
batches) needs them.

What differs from flax, on purpose (each for correctness):

- Statistics are float32 (float64 for float64 input) and two-pass, exact where flax's default
  one-pass ``E[x^2] - E[x]^2`` loses digits: `use_fast_variance` and
  `force_float32_reductions` are accepted and have no effect on them.
- With `axis_name`, statistics merge (count, mean, m2) exactly across devices, also when
  devices hold different numbers of valid values; flax averages per-device means.
- A training batch with non-finite statistics leaves ``batch_stats`` untouched (flax stores
  NaN); `bnjax.diagnostics` reports it, and ``track_counters=True`` counts it.
- A statistic with no valid value (everything masked) uses mean 0 and variance 0; flax gives NaN.
  A channel with fewer than two valid values keeps its running statistics (flax folds in the
  variance 0 of a single value).
- `use_running_average` must be True, False or None (flax reads any value as a bool, so the
  string 'False' would evaluate).
- BatchNorm statistics from a single value (a batch of one in training, outside ``init``)
  raise an error instead of silently returning the bias.
"""

from __future__ import annotations

# In the order of the API reference page (mkdocstrings renders them in source order).
# isort: off
from bnjax.linen.batch_norm import BatchNorm, BatchRenorm
from bnjax.linen.per_example import GroupNorm, LayerNorm, RMSNorm, InstanceNorm
from bnjax.linen.standardized_conv import CenteredConv, StandardizedConv
from bnjax.linen.moving_average import (
    PROBE_COLLECTION,
    MovingAverageBatchNorm,
    backward_probes,
    apply_backward_statistics,
)
from bnjax.linen.domain import DomainBatchNorm
from bnjax.linen.norm_activation import FilterResponseNorm, EvoNormS0, EvoNormB0
from bnjax.linen.cross_iteration import CrossIterationConvBatchNorm
# isort: on

__all__ = [
    "PROBE_COLLECTION",
    "BatchNorm",
    "BatchRenorm",
    "CenteredConv",
    "CrossIterationConvBatchNorm",
    "DomainBatchNorm",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "MovingAverageBatchNorm",
    "RMSNorm",
    "StandardizedConv",
    "apply_backward_statistics",
    "backward_probes",
]
