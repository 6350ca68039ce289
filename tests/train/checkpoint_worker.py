"""A process that saves checkpoints back to back until it is killed (run by test_kill.py).

    python -m tests.train.checkpoint_worker DIR [--kill-before-commit STEP]

It resumes from the newest checkpoint in DIR (checking it is bitwise `state_for(step)`),
prints "ready <first step>", then saves `state_for(step)` for step = first, first + 1, ...
printing "saved <step>" after each `save` call returns. With --kill-before-commit it SIGKILLs
itself when orbax is about to rename the finished tmp directory of STEP to its final name.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np

from bnjax.train import Checkpointer

SIZE = 1 << 21  # 8 MiB of float32: a save takes tens of milliseconds


def state_for(step: int) -> dict:
    """The deterministic training state of `step` (different bits at every step)."""
    base = np.linspace(-3.0, 3.0, SIZE, dtype=np.float32)
    return {
        "params": {"w": base + np.float32(step), "b": np.full(7, step, np.int8)},
        "batch_stats": {
            "bn": {
                "mean": np.full(4, step / 7, np.float32),
                "var": np.full(4, 1.0 + step, np.float32),
            }
        },
        "key": jax.random.fold_in(jax.random.key(0), step),
        "step": step,
    }


def bits(tree) -> list[bytes]:
    """Every leaf's raw bytes (typed PRNG keys through their key data), in order."""
    leaves = []
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaves.append(np.asarray(leaf).tobytes() + str(np.asarray(leaf).dtype).encode())
    return leaves


def open_checkpointer(directory: str) -> Checkpointer:
    return Checkpointer(directory, max_to_keep=3, async_save=True)


def _kill_before_commit(step: int) -> None:
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def rename_or_die(source, destination, *args, **kwargs):
        if os.path.basename(str(destination)) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await rename(source, destination, *args, **kwargs)

    async_path.rename = rename_or_die


def main(argv: list[str]) -> None:
    directory = argv[1]
    if "--kill-before-commit" in argv:
        _kill_before_commit(int(argv[argv.index("--kill-before-commit") + 1]))
    checkpointer = open_checkpointer(directory)
    restored = checkpointer.restore_latest(state_for(0))
    first = 0
    if restored is not None:
        step, state = restored
        if bits(state) != bits(state_for(step)):
            sys.exit(f"restored step {step} differs from state_for({step})")
        first = step + 1
    print("ready", first, flush=True)
    for step in range(first, first + 10_000):
        checkpointer.save(step, state_for(step))
        print("saved", step, flush=True)


if __name__ == "__main__":
    main(sys.argv)
