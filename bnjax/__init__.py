"""bnjax: pure-functional normalization for JAX/Flax, and a study of batch composition.

>>> import bnjax
>>> state = bnjax.batch_norm_state(64)
>>> # y, state = bnjax.batch_norm(x, state, scale, bias, training=True)
"""

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    CrossIterationState,
    Moments,
    RenormSchedule,
    batch_norm,
    batch_norm_state,
    batch_renorm,
    batch_renorm_state,
    cross_iteration_batch_norm,
    cross_iteration_state,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)

__version__ = "0.1.0"

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
