"""Checkpoints read back without knowing their structure, checked against their checksums.

A step written by `bnjax.checkpoints.Checkpointer` holds two items, ``<step>/state`` (the state
pytree) and ``<step>/manifest`` (a CRC32 per leaf, taken at save time). Every form of path to
such a step is read through ``Checkpointer.restore``, so every leaf is checked:

    WORKDIR                         a training workdir: its newest step (or `step`)
    WORKDIR/checkpoints             the Checkpointer's directory: its newest step (or `step`)
    WORKDIR/checkpoints/300         one step
    WORKDIR/checkpoints/300/state   the step's state item (or its manifest item): that step

A leaf that fails its checksum, a truncated or missing file, and a step whose manifest is
missing raise `bnjax.checkpoints.CorruptCheckpointError` naming the step (and the leaf): a step
without its manifest cannot be told from a corrupt one. A directory is taken for a
Checkpointer's when one of its steps has a manifest item (on disk, or named in orbax's step
metadata) or when it is the ``checkpoints`` directory of a workdir (beside ``config.json``).

Other checkpoints (any other orbax PyTree checkpoint or ``CheckpointManager``, a flax msgpack
file) carry no checksums: they are read as they are, with an `UnverifiedCheckpointWarning`
saying so. ``verify=False`` is the explicit opt-out: nothing is checked and nothing is said
(to salvage what a step with a lost manifest still holds).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple

import flax.serialization

__all__ = ["CheckpointLocation", "UnverifiedCheckpointWarning", "load_checkpoint", "locate"]

# The items of a bnjax.checkpoints.Checkpointer step, and the files orbax writes into checkpoints.
_STATE, _MANIFEST = "state", "manifest"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # a CheckpointManager step's: names its items
_PYTREE_METADATA = "_METADATA"  # an orbax PyTree checkpoint's
_CONFIG = "config.json"  # beside the checkpoints directory of a training workdir


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was read with no checksums to check it against (not a Checkpointer's).

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "variables.msgpack")
      ...     with open(path, "wb") as file:
      ...         _ = file.write(flax.serialization.to_bytes({"w": np.ones(2)}))
      ...     with warnings.catch_warnings(record=True) as caught:
      ...         warnings.simplefilter("always")
      ...         _ = load_checkpoint(path)
      >>> caught[0].category.__name__, "has no checksums" in str(caught[0].message)
      ('UnverifiedCheckpointWarning', True)
    """


class CheckpointLocation(NamedTuple):
    """Where a path given by a user points.

    `path` is a `bnjax.checkpoints.Checkpointer` directory when `checkpointer` is True (`step`: the
    step asked for, or None for the newest), else the orbax directory or file to read.
    """

    path: str
    step: int | None
    checkpointer: bool


def _steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    )


def _names_manifest(step_directory: str) -> bool:
    """Whether a step has a manifest item: on disk, or in orbax's metadata of the step (which
    outlives a deleted manifest directory)."""
    if os.path.isdir(os.path.join(step_directory, _MANIFEST)):
        return True
    try:
        with open(os.path.join(step_directory, _STEP_METADATA)) as file:
            handlers = json.load(file).get("item_handlers")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(handlers, dict) and _MANIFEST in handlers


def _is_checkpointer_directory(directory: str) -> bool:
    if os.path.basename(directory) == "checkpoints" and os.path.isfile(
        os.path.join(os.path.dirname(directory), _CONFIG)
    ):
        return True  # a training workdir's: every step there was written by its Checkpointer
    return any(_names_manifest(os.path.join(directory, str(s))) for s in _steps(directory))


def _is_checkpointer_step(path: str) -> bool:
    return (
        os.path.basename(path).isdigit()
        and os.path.isdir(path)
        and (_names_manifest(path) or _is_checkpointer_directory(os.path.dirname(path)))
    )


def locate(path: str, step: int | None = None) -> CheckpointLocation:
    """What `path` names (see the module docstring): a Checkpointer directory and step, or
    another checkpoint. ValueError when `step` conflicts with a step directory's number.

    Example:
      >>> locate("/runs/a/checkpoints/300/state")  # no such run: read as a plain orbax path
      CheckpointLocation(path='/runs/a/checkpoints/300/state', step=None, checkpointer=False)
    """
    path = os.path.abspath(os.fspath(path))
    inner = os.path.join(path, "checkpoints")
    if (
        os.path.isdir(inner)
        and not _steps(path)
        and not os.path.exists(os.path.join(path, _PYTREE_METADATA))
    ):
        path = inner  # a training workdir
    if os.path.basename(path) in (_STATE, _MANIFEST) and _is_checkpointer_step(
        os.path.dirname(path)
    ):
        path = os.path.dirname(path)  # an item of a step: the step
    if _is_checkpointer_step(path):
        number = int(os.path.basename(path))
        if step is not None and step != number:
            raise ValueError(f"step {step} conflicts with the step directory {path!r}")
        return CheckpointLocation(os.path.dirname(path), number, True)
    checkpointer = bool(_steps(path)) and _is_checkpointer_directory(path)
    return CheckpointLocation(path, step, checkpointer)


def read_checkpointer_step(directory: str, step: int) -> Any:
    """The state of `step` in a Checkpointer `directory`, every leaf checked against its CRC32.

    Raises `bnjax.checkpoints.CorruptCheckpointError` naming the step when its manifest is missing,
    a leaf fails its checksum (the leaf is named), or a file is missing or truncated.
    """
    # Imported here: bnjax.checkpoints imports bnjax.lifecycle (`validate_statistics`, which
    # refuses bad statistics at save), and bnjax.lifecycle imports this module.
    from bnjax.checkpoints import (
        Checkpointer,
        CheckpointMismatchError,
        CorruptCheckpointError,
        root_cause,
    )

    step_directory = os.path.join(directory, str(step))
    if not os.path.isdir(os.path.join(step_directory, _MANIFEST)):
        raise CorruptCheckpointError(
            f"step {step} of {directory} has no checksum manifest ({_MANIFEST}/ is missing): "
            "its bytes cannot be verified (load_checkpoint(..., verify=False) reads it unchecked)"
        )
    try:
        return Checkpointer(directory, read_only=True).restore(step)
    except CheckpointMismatchError:
        raise  # written in an older format: not corruption, and the error says what to do
    except Exception as error:
        raise CorruptCheckpointError(
            f"step {step} of {directory} is corrupt or unreadable ({root_cause(error)})"
        ) from None


def _restore_pytree(path: str) -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _read_unchecked(path: str, step: int | None) -> Any:
    """An orbax PyTree checkpoint, a CheckpointManager's step or root, or a msgpack file."""
    if os.path.isfile(path):
        with open(path, "rb") as file:
            return flax.serialization.msgpack_restore(file.read())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint at {path!r}.")
    if os.path.exists(os.path.join(path, _PYTREE_METADATA)):
        return _restore_pytree(path)
    steps = _steps(path)
    if steps:
        if step is not None and step not in steps:
            raise FileNotFoundError(f"No step {step} in {path!r}; steps: {steps}.")
        return _read_unchecked(
            os.path.join(path, str(step if step is not None else steps[-1])), None
        )
    items = {
        name: os.path.join(path, name)
        for name in sorted(os.listdir(path))
        if os.path.exists(os.path.join(path, name, _PYTREE_METADATA))
    }
    if not items:
        raise ValueError(f"{path!r} holds no orbax PyTree checkpoint (no _METADATA file).")
    trees = {name: _restore_pytree(item) for name, item in items.items()}
    return next(iter(trees.values())) if len(trees) == 1 else trees


def load_checkpoint(path: str, step: int | None = None, *, verify: bool = True) -> Any:
    """Restores a checkpoint without knowing its structure (no target), as numpy-backed dicts.

    `path` may be a training workdir, a `bnjax.checkpoints.Checkpointer` directory, one of its steps
    or a step's item (each read through the step's CRC32 manifest; see the module docstring),
    an orbax PyTree checkpoint directory, a step directory of a ``CheckpointManager`` (its
    PyTree items are restored into {item: tree}, or the tree itself when there is one), a
    manager's root (the latest step, or `step`), or a flax msgpack file.

    Args:
      path: the checkpoint, as above.
      step: the step of a directory of steps; None for the newest.
      verify: False reads without checking checksums, and without the warning for a
        checkpoint that has none.

    Raises FileNotFoundError or ValueError when there is nothing to restore, and
    `bnjax.checkpoints.CorruptCheckpointError` for a Checkpointer step that fails its checksums or
    has no manifest. Warns `UnverifiedCheckpointWarning` for a checkpoint without checksums.

    Example:
      >>> import os, tempfile
      >>> variables = {"batch_stats": {"bn": {"mean": np.zeros(2), "var": np.ones(2)}}}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "variables.msgpack")
      ...     with open(path, "wb") as file:
      ...         _ = file.write(flax.serialization.to_bytes(variables))
      ...     restored = load_checkpoint(path, verify=False)  # a msgpack file has no checksums
      >>> restored["batch_stats"]["bn"]["var"].tolist()
      [1.0, 1.0]
    """
    location = locate(path, step)
    if location.checkpointer:
        steps = _steps(location.path)
        chosen = location.step if location.step is not None else steps[-1]
        if chosen not in steps:
            raise FileNotFoundError(f"No step {chosen} in {location.path!r}; steps: {steps}.")
        if verify:
            return read_checkpointer_step(location.path, chosen)
        return _restore_pytree(os.path.join(location.path, str(chosen), _STATE))
    tree = _read_unchecked(location.path, location.step)
    if verify:
        warnings.warn(
            f"{location.path} has no checksums (it was not written by bnjax.train.Checkpointer): "
            "its bytes were read unverified; pass verify=False to read it without this warning",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    return tree
