"""A ``scripts/train.py`` workdir back to a model, its trained variables and real inputs.

The workdir holds the config the run trained with (``config.json``, `bnjax.train.workdir`) and
its checkpoints (``checkpoints/<step>``, `bnjax.train.Checkpointer`). `load_workdir` rebuilds
the evaluation network from the config exactly as the training loop does
(``make_model(**model_settings(config, num_classes), for_training=False)``), restores a step
(the newest by default; every leaf checked against its CRC32) and draws a calibration batch
from the run's held-out split, evenly spread over it.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from bnjax import data, models
from bnjax.train.checkpoints import Checkpointer
from bnjax.train.loop import model_settings
from bnjax.train.steps import STATE_COLLECTIONS, make_model
from bnjax.train.workdir import CONFIG_FILE, load_config

__all__ = ["TrainedRun", "load_workdir"]


class TrainedRun(NamedTuple):
    """A restored run: the linen `model` (evaluation network), its `variables` ('params' and
    'batch_stats'), `calibration` inputs (N, ...), the `step` and the saved `config`.

    Example:
      >>> # run = load_workdir("runs/resnet20"); then, for serving:
      >>> # folded = lifecycle.fold_model(run.model, run.variables, run.calibration, train=False)
      >>> TrainedRun._fields
      ('model', 'variables', 'calibration', 'step', 'config')
    """

    model: Any
    variables: dict
    calibration: np.ndarray
    step: int
    config: dict


def load_workdir(workdir: str, *, step: int | None = None, examples: int = 16) -> TrainedRun:
    """Restores the run in `workdir` (the newest step unless `step`) for export.

    Raises FileNotFoundError when `workdir` holds no config.json or no checkpoint, and
    ValueError when the checkpoint lacks the batch-norm statistics its model needs.

    Example:
      >>> load_workdir("/nonexistent")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      FileNotFoundError: /nonexistent has no config.json: not a scripts/train.py workdir ...
    """
    config = load_config(workdir)
    if config is None:
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}: not a scripts/train.py workdir (pass --workdir of "
            f"a training run)."
        )
    config = ml_collections.ConfigDict(config)
    test = data.load(config.dataset, "test", seed=config.seed, data_dir=config.get("data_dir"))
    model = make_model(**model_settings(config, test.num_classes), for_training=False)
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}: has the run saved a step?")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no step {step} in {directory}; steps: {steps}.")
        state = checkpointer.restore(step)
    finally:
        checkpointer.close()
    variables = {"params": state["params"]}
    variables.update({c: state[c] for c in STATE_COLLECTIONS if c in state})
    if config.norm in models.BATCH_STATISTICS_NORMS and "batch_stats" not in variables:
        raise ValueError(
            f"step {step} of {directory} has no 'batch_stats': the running statistics the "
            f"{config.norm} norms evaluate with were stripped from the checkpoint."
        )
    count = min(examples, len(test))
    chosen = np.linspace(0, len(test) - 1, count).astype(int)
    return TrainedRun(model, variables, np.asarray(test.images[chosen]), step, config.to_dict())
