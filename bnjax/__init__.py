"""bnjax: pure-functional normalization for JAX/Flax, and a study of batch composition.

>>> import bnjax
>>> state = bnjax.batch_norm_state(64)
>>> # y, state = bnjax.batch_norm(x, state, scale, bias, training=True)
"""

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    CrossIterationState,
    DomainBatchNormState,
    EvoNormB0State,
    Moments,
    MovingAverageBatchNormState,
    RenormSchedule,
    batch_norm,
    batch_norm_state,
    batch_renorm,
    batch_renorm_state,
    centralize_weight,
    cross_iteration_batch_norm,
    cross_iteration_state,
    domain_batch_norm,
    domain_batch_norm_state,
    evonorm_b0,
    evonorm_b0_state,
    evonorm_s0,
    filter_response_norm,
    group_norm,
    instance_norm,
    layer_norm,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
    rms_norm,
    standardize_weight,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "BatchRenormState",
    "CrossIterationState",
    "DomainBatchNormState",
    "EvoNormB0State",
    "Moments",
    "MovingAverageBatchNormState",
    "RenormSchedule",
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
]
