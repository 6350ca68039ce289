"""One process of the many-host recalibration test:

    python -m tests.train.multihost_recalibrate_worker WORKDIR OUT_DIR

test_multihost_train.py starts two of these (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID in the environment, two CPU devices each). Each restores the final checkpoint
of the run in WORKDIR, reads only its own rows of every recalibration batch, assembles the
global batches on the 4-device mesh and recalibrates the model's batch-norm statistics under
jit with `bnjax.lifecycle.recalibrate`; it writes the statistics it sees to
OUT_DIR/process{id}.npz, keys `jax.tree_util.keystr` paths.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np

from bnjax import data, parallel
from bnjax.lifecycle import recalibrate
from bnjax.train import Checkpointer, loop, steps
from bnjax.train.defaults import base_config
from tests.train.helpers import TINY

# The training run of test_multihost_train.py (its checkpoints are what is recalibrated).
SETTINGS = TINY | dict(log_every=3, checkpoint_every=3, progress=False)
BATCH = 64  # global recalibration batch
NUM_BATCHES = 3


def config(**overrides):
    settings = base_config()
    settings.update(SETTINGS, **overrides)
    return settings


@functools.cache
def template():
    """The run's initial state, as numpy: the restore target of its checkpoints (one written
    by many processes restores in one process only with a target)."""
    settings = config()
    train = data.load(settings.dataset, "train", seed=settings.seed)
    optimizer = loop.schedule_and_optimizer(settings)[1]
    state = steps.initial_state(eval_model(), optimizer, train.images[:2], settings.seed)
    return jax.tree.map(np.asarray, state)


def eval_model():
    settings = config()
    num_classes = data.load(settings.dataset, "test", seed=settings.seed).num_classes
    return steps.make_model(**loop.model_settings(settings, num_classes), for_training=False)


def final_state(workdir) -> tuple[int, dict]:
    """(step, state) of the newest checkpoint in ``workdir/checkpoints``, as numpy."""
    with Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as checkpointer:
        step = checkpointer.latest_step()
        return step, checkpointer.restore(step, template())


def recalibration_images() -> np.ndarray:
    """The global batches recalibrated on: (NUM_BATCHES, BATCH, ...) training images."""
    settings = config()
    images = data.load(settings.dataset, "train", seed=settings.seed).images
    return images[: NUM_BATCHES * BATCH].reshape(NUM_BATCHES, BATCH, *images.shape[1:])


def recalibrated(state, batches) -> dict:
    """`recalibrate` of the state's batch-norm statistics (apply as in evaluation)."""
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    new = recalibrate(eval_model(), variables, batches, apply_kwargs={"train": False})
    return new["batch_stats"]


def flatten(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def main(workdir: str, out_dir: str) -> None:
    assert parallel.initialize_distributed(initialization_timeout=60)
    assert (jax.process_count(), jax.device_count()) == (2, 4)
    mesh = parallel.data_mesh()
    _, state = final_state(workdir)
    state = parallel.replicate(state, mesh)
    rows = parallel.local_rows(mesh, BATCH)
    batches = [  # this process reads its rows only
        parallel.local_batch_to_global(images[rows], mesh) for images in recalibration_images()
    ]
    statistics = parallel.to_host(recalibrated(state, batches))
    np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"), **flatten(statistics))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
