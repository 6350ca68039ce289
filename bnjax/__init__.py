"""bnjax: pure-functional normalization for JAX/Flax, and a study of batch composition.

>>> import bnjax
>>> state = bnjax.batch_norm_state(64)
>>> # y, state = bnjax.batch_norm(x, state, scale, bias, training=True)
"""

from bnjax.core import (
    BatchNormState,
    BatchRenormState,
    EvoNormB0State,
    Moments,
    RenormSchedule,
    batch_norm,
    batch_norm_state,
    batch_renorm,
    batch_renorm_state,
    evonorm_b0,
    evonorm_b0_state,
    evonorm_s0,
    filter_response_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)

__version__ = "0.1.0"

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
