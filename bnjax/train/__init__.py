"""Training infrastructure: checkpoints and metrics (the train state and loop come next).

- `Checkpointer`: orbax checkpoints, periodic and keep-N, asynchronous, verified by checksums;
  `restore_latest` falls back past corrupt checkpoints; non-finite states are refused.
- `MetricWriter`: metrics as JSON lines and TensorBoard event files (no TensorFlow), with
  duplicate-free resume; `read_metrics` reads the JSON lines back.
"""

from bnjax.train.checkpoints import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    UnsafeStateError,
)
from bnjax.train.metrics import MetricWriter, read_metrics

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "Checkpointer",
    "MetricWriter",
    "UnsafeStateError",
    "read_metrics",
]
