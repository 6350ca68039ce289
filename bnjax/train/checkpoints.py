"""Moved: the Checkpointer lives in `bnjax.checkpoints.checkpointer`; re-exported here."""

from bnjax.checkpoints.checkpointer import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeStateError,
)

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpointer",
    "CorruptCheckpointError",
    "UnsafeStateError",
]
