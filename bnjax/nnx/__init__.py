"""flax.nnx modules over the bnjax core: swap ``nnx.BatchNorm`` for ``bnjax.nnx.BatchNorm``.

Each module creates its parameters and state, then calls one core function (the math lives
there: `bnjax.batch_norm`, `bnjax.batch_renorm`, `bnjax.group_norm`, `bnjax.layer_norm`,
`bnjax.instance_norm`, `bnjax.rms_norm`). Constructors keep flax's arguments, defaults and rng
use (one ``rngs.params()`` key per created scale/bias, as flax, so the layers around keep their
init), and the state has exactly flax's variables:

- ``nnx.Param`` ``scale``, ``bias``; ``nnx.BatchStat`` ``mean``, ``var`` (float32).

``track_counters=True`` adds two int32 ``nnx.BatchStat`` scalars, ``count`` (batches folded into
the running statistics) and ``skipped`` (non-finite training batches left out), so the usual
``nnx.split(model, nnx.Param, nnx.BatchStat)`` still covers the whole state.
``momentum=None`` (a cumulative average) needs them.

``model.train()`` / ``model.eval()`` (and ``nnx.view(model, use_running_average=...)``) switch
`use_running_average` exactly as for flax's BatchNorm; the call argument takes precedence.
`promote_dtype` is applied as in flax to the input and the parameters; the statistics stay
float32 (flax's default also casts the running statistics to `dtype`). Other differences from
flax are those of `bnjax.linen` (exact two-pass float32 statistics whatever
`use_fast_variance`, exact cross-device merges, non-finite batches skipped).
"""

from __future__ import annotations

# In the order of the API reference page (mkdocstrings renders them in source order).
# isort: off
from bnjax.nnx.batch_norm import BatchNorm, BatchRenorm
from bnjax.nnx.per_example import GroupNorm, LayerNorm, RMSNorm, InstanceNorm
from bnjax.nnx.standardized_conv import CenteredConv, StandardizedConv
from bnjax.nnx.moving_average import BackwardProbe, MovingAverageBatchNorm
from bnjax.nnx.domain import DomainBatchNorm
from bnjax.nnx.norm_activation import FilterResponseNorm, EvoNormS0, EvoNormB0
from bnjax.nnx.cross_iteration import CrossIterationConvBatchNorm
# isort: on

__all__ = [
    "BackwardProbe",
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
]
