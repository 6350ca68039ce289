"""Small training configs and the final checkpoint of a run, shared by the loop's tests."""

import os

from bnjax.checkpoints import Checkpointer
from bnjax.train.defaults import base_config

TINY = dict(
    model_features=(8, 16),
    batch_size=32,
    eval_batch_size=200,
    num_steps=12,
    warmup_steps=2,
    log_every=4,
    eval_every=6,
    checkpoint_every=4,
)
"""The config keys that shrink the default run to seconds on a CPU."""


def tiny_config(**overrides):
    """The default config shrunk to seconds on one CPU device, with `overrides` applied."""
    config = base_config()
    config.update(TINY, num_devices=1)
    config.update(overrides)
    return config


def final_state(workdir):
    """(step, state) of the newest checkpoint in ``workdir/checkpoints``."""
    with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
        step = checkpointer.latest_step()
        return step, checkpointer.restore(step)
