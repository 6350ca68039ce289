"""Training: the loop behind ``scripts/train.py``, its steps, checkpoints and metrics.

- `bnjax.train.loop.train_and_evaluate(config, workdir)`: the whole run (data, sampler, model,
  optimizer, resume, train, evaluate, checkpoint); every config key is in
  `bnjax.train.defaults`, checked by `bnjax.train.config`.
- `bnjax.train.steps`: the state pytree and the per-device train/eval steps, one for every
  parallel mode of `bnjax.parallel`; `bnjax.train.optim`: optimizer and schedule.
- `Checkpointer`: orbax checkpoints, periodic and keep-N, asynchronous, verified by checksums;
  `restore_latest` falls back past corrupt checkpoints; non-finite states are refused (from
  the library package `bnjax.checkpoints`, re-exported here).
- `load_workdir`: a finished run's evaluation model, restored variables and a calibration
  batch (`bnjax.train.trained_run`; what ``python -m bnjax.export --workdir`` serves).
- `MetricWriter`: metrics as JSON lines and TensorBoard event files (no TensorFlow), with
  duplicate-free resume; `read_metrics` reads the JSON lines back.

bnjax.train is an application on top of the library: it needs ``pip install 'bnjax[train]'``.
"""

from bnjax import extras

extras.require("train", "bnjax.train")

# The extras check comes first so that a missing package is reported with its install command.
from bnjax.checkpoints import (  # noqa: E402
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    CorruptCheckpointError,
    UnsafeStateError,
)
from bnjax.train.metrics import MetricWriter, read_metrics  # noqa: E402
from bnjax.train.trained_run import TrainedRun, load_workdir  # noqa: E402

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "Checkpointer",
    "CorruptCheckpointError",
    "MetricWriter",
    "TrainedRun",
    "UnsafeStateError",
    "load_workdir",
    "read_metrics",
]
