"""A ``scripts/train.py`` workdir back to a model, its trained variables and real inputs.

The workdir holds the config the run trained with (``config.json``, `bnjax.train.workdir`) and
its checkpoints (``checkpoints/<step>``, `bnjax.train.Checkpointer`). `load_workdir` rebuilds
the evaluation network from the config exactly as the training loop does
(``make_model(**model_settings(config, num_classes), for_training=False)``), restores a step
(every leaf checked against its CRC32) and draws a calibration batch from the run's held-out
split, evenly spread over it.

Without `step`, the newest step that restores is used, as when training resumes: a newer one
that does not (truncated files, a missing checksum manifest) is passed over with a
`bnjax.train.CheckpointWarning` naming it. Nothing in the workdir is moved or deleted. An
explicitly requested step that does not restore is a ValueError naming it.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from bnjax import data, models
from bnjax.checkpoints import Checkpointer, CheckpointMismatchError, root_cause
from bnjax.train.averaged_model import AVERAGE, averaged_eval_state
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


def _restore_step(checkpointer: Checkpointer, step: int, directory: str, steps: list[int]):
    try:
        return checkpointer.restore(step)
    except CheckpointMismatchError:
        raise
    except Exception as error:  # any failure to read: the step is unusable, say which
        raise ValueError(
            f"checkpoint step {step} in {directory} does not restore ({root_cause(error)}); "
            f"export another --step of {steps}, or leave --step out for the newest readable one."
        ) from None


def load_workdir(
    workdir: str, *, step: int | None = None, examples: int = 16, averaged: bool = False
) -> TrainedRun:
    """Restores the run in `workdir` (the newest step unless `step`) for export.

    With `averaged` the variables are those of the run's averaged model (``config.ema_decay >
    0``: the checkpoint's 'ema', with its averaged batch statistics) instead of the trained
    ones; a ValueError when the run kept none.

    Raises FileNotFoundError when `workdir` holds no config.json or no readable checkpoint,
    and ValueError when the requested `step` does not restore or the checkpoint lacks the
    batch-norm statistics its model needs.

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
            restored = checkpointer.restore_latest()  # warns of each step passed over
            if restored is None:
                raise FileNotFoundError(
                    f"no readable checkpoint in {directory}: steps {steps} all fail to restore."
                )
            step, state = restored
        elif step not in steps:
            raise FileNotFoundError(f"no step {step} in {directory}; steps: {steps}.")
        else:
            state = _restore_step(checkpointer, step, directory, steps)
    finally:
        checkpointer.close()
    if averaged:
        if AVERAGE not in state:
            raise ValueError(
                f"step {step} of {directory} holds no averaged model: the run trained with "
                "config.ema_decay=0; export it without --averaged."
            )
        variables = averaged_eval_state(model, state)
    else:
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
