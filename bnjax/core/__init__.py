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
from bnjax.core.domain_batch_norm import (
    DomainBatchNormState,
    domain_batch_norm,
    domain_batch_norm_state,
)
from bnjax.core.evonorm import EvoNormB0State, evonorm_b0, evonorm_b0_state, evonorm_s0
from bnjax.core.filter_response_norm import filter_response_norm
from bnjax.core.group_norm import group_norm, instance_norm, layer_norm, rms_norm
from bnjax.core.moving_average_batch_norm import (
    MovingAverageBatchNormState,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
)
from bnjax.core.stats import Moments
from bnjax.core.stream_norm import (
    StreamRenormState,
    stream_batch_renorm,
    stream_renorm_state,
    stream_renorm_state_from,
    streaming_population_norm,
    streaming_population_state,
)
from bnjax.core.weight_standardization import centralize_weight, standardize_weight

__all__ = [
    "BatchNormState",
    "BatchRenormState",
    "CrossIterationState",
    "DomainBatchNormState",
    "EvoNormB0State",
    "Moments",
    "MovingAverageBatchNormState",
    "RenormSchedule",
    "StreamRenormState",
    "batch_norm",
    "batch_norm_state",
    "batch_renorm",
    "batch_renorm_state",
    "centralize_weight",
    "cross_iteration_batch_norm",
    "cross_iteration_state",
    "domain_batch_norm",
    "domain_batch_norm_state",
    "evonorm_b0",
    "evonorm_b0_state",
    "evonorm_s0",
    "filter_response_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moving_average_batch_norm",
    "moving_average_batch_norm_backward_update",
    "moving_average_batch_norm_probe",
    "moving_average_batch_norm_state",
    "rms_norm",
    "standardize_weight",
    "stream_batch_renorm",
    "stream_renorm_state",
    "stream_renorm_state_from",
    "streaming_population_norm",
    "streaming_population_state",
]
