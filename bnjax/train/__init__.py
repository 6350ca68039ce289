"""Training: the loop behind ``scripts/train.py``, its steps, checkpoints and metrics.

- `bnjax.train.loop.train_and_evaluate(config, workdir)`: the whole run (data, sampler, model,
  optimizer, resume, train, evaluate, checkpoint); every config key is in
  `bnjax.train.defaults`, checked by `bnjax.train.config`.
- `bnjax.train.steps`: the state pytree and the per-device train/eval steps, one for every
  parallel mode of `bnjax.parallel`; `bnjax.train.optim`: optimizer and schedule.
- `Checkpointer`: orbax checkpoints, periodic and keep-N, asynchronous, verified by checksums;
  `restore_latest` falls back past corrupt checkpoints; non-finite states are refused (from
  the library package `bnjax.checkpoints`, re-exported here).
- `MetricWriter`: metrics as JSON lines and TensorBoard event files (no TensorFlow), with
  duplicate-free resume; `read_metrics` reads the JSON lines back.
"""

from bnjax.checkpoints import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    CorruptCheckpointError,
    UnsafeStateError,
)
from bnjax.train.metrics import MetricWriter, read_metrics

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "Checkpointer",
    "CorruptCheckpointError",
    "MetricWriter",
    "UnsafeStateError",
    "read_metrics",
]
