"""The functional core: pure normalizers with explicit state (jnp and lax only, no flax)."""

from bnjax.core.batch_norm import BatchNormState, batch_norm, batch_norm_state
from bnjax.core.batch_renorm import (
    BatchRenormState,
    RenormSchedule,
    batch_renorm,
    batch_renorm_state,
)
from bnjax.core.cross_iteration_batch_norm import (
    CrossIterationState,
    cross_iteration_batch_norm,
    cross_iteration_state,
)
from bnjax.core.group_norm import group_norm, instance_norm, layer_norm, rms_norm
from bnjax.core.stats import Moments

__all__ = [
    "BatchNormState",
    "BatchRenormState",
    "CrossIterationState",
    "Moments",
    "RenormSchedule",
    "batch_norm",
    "batch_norm_state",
    "batch_renorm",
    "batch_renorm_state",
    "cross_iteration_batch_norm",
    "cross_iteration_state",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]
