"""Checkpoints: orbax's format plus a CRC32 per leaf, written and read back verified.

- `Checkpointer` (`bnjax.checkpoints.checkpointer`): periodic, keep-N, asynchronous orbax
  checkpoints; every restore is checked against the checksums taken at save;
  `restore_latest` falls back past corrupt steps; non-finite states are refused.
- `bnjax.checkpoints.checksum_manifest`: the manifest beside each step's state (its format,
  a CRC32 per leaf named by its key path) and the leaf checks behind restores.
- `bnjax.checkpoints.orbax_noise`: `quiet_orbax`, the block in which a failed orbax read is
  one error for the caller and no log spam, with nothing left installed after it.

A library package: it needs jax, numpy and orbax-checkpoint (which flax depends on), and
`bnjax.lifecycle.validation` to refuse batch-norm statistics that are not finite.
`bnjax.train` re-exports the public names; `bnjax.lifecycle.load_checkpoint` reads with them.
"""

from bnjax.checkpoints.checkpointer import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeStateError,
)
from bnjax.checkpoints.orbax_noise import root_cause

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpointer",
    "CorruptCheckpointError",
    "UnsafeStateError",
    "root_cause",
]
