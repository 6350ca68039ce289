"""The functional core: pure normalizers with explicit state (jnp and lax only, no flax)."""

from bnjax.core.batch_norm import BatchNormState, batch_norm, batch_norm_state
from bnjax.core.batch_renorm import (
    BatchRenormState,
    RenormSchedule,
    batch_renorm,
    batch_renorm_state,
)
from bnjax.core.evonorm import EvoNormB0State, evonorm_b0, evonorm_b0_state, evonorm_s0
from bnjax.core.filter_response_norm import filter_response_norm
from bnjax.core.group_norm import group_norm, instance_norm, layer_norm, rms_norm
from bnjax.core.stats import Moments

__all__ = [
    "BatchNormState",
    "BatchRenormState",
    "EvoNormB0State",
    "Moments",
    "RenormSchedule",
    "batch_norm",
    "batch_norm_state",
    "batch_renorm",
    "batch_renorm_state",
    "evonorm_b0",
    "evonorm_b0_state",
    "evonorm_s0",
    "filter_response_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]
