"""Orbax checkpoints that survive SIGKILL, corrupt files and non-finite training states.

`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``. A step directory holds two items:

    DIRECTORY/<step>/state/      the state pytree (orbax PyTree format, StandardSave)
    DIRECTORY/<step>/manifest/   JSON: {"format", "step", "leaves": {"a/b/kernel":
                                 {"shape", "dtype", "crc32", ["prng_impl"]}}}

Guarantees:

- **Atomic saves.** Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
  when complete, so a process killed during a save (SIGKILL included) leaves no step that
  looks complete. Leftover tmp directories are deleted when the next `Checkpointer` opens.
- **Verified restores.** Each leaf's CRC32 is stored at save and checked at restore (orbax
  itself restores flipped bytes silently). `restore_latest` walks back from the newest step:
  a step that fails to restore (missing or truncated files, bad checksum) is reported with a
  `CheckpointWarning` naming it and moved to ``DIRECTORY/corrupt/`` (``quarantine=True``, on
  process 0), so the resumed run can save that step again. A checkpoint whose structure,
  shapes or dtypes differ from the target (a changed model) raises
  `CheckpointMismatchError` instead: that is not corruption.
- **Only finite states.** `save` raises `UnsafeStateError` (and writes nothing) for a state
  with a NaN/inf in any floating leaf, or batch-norm statistics that
  `bnjax.lifecycle.validate_statistics` finds non-finite or negative. The previous
  checkpoints stay the last good ones.
- **Exact round trip.** Leaves come back with their dtype and bits (bf16, fp16, float64 numpy
  arrays, integers, bools). numpy leaves come back as numpy, jax arrays as jax arrays (with
  the target's sharding), Python scalars as Python scalars. Zero-size arrays are not
  supported (orbax refuses them).

PRNG keys: a typed key (``jax.random.key``) leaf is stored as ``jax.random.key_data(key)``
(uint32) with its implementation name, and restored with ``jax.random.wrap_key_data`` when the
target leaf is a typed key (or with no target). Raw uint32 keys (``jax.random.PRNGKey``) are
plain arrays. Either way the restored key is bitwise the saved one.

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3, save_interval_steps=100)
    restored = ckpt.restore_latest(state)          # state: a template with the right shapes
    step, state = restored if restored else (0, state)
    ...
    ckpt.save(step, state)                         # saves when step % 100 == 0 (async)
    ckpt.close()                                   # waits for the last save

Saves are asynchronous by default: `save` returns after copying the state to host memory;
the files are written in the background, and `wait_until_finished` (or the next `save`,
`restore_latest`, `close`) waits for them. Checksums are computed in `save` itself, on host
copies of the leaves (not for arrays that span several processes: their CRC is not checked).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bnjax.lifecycle.validation import validate_statistics
from bnjax.train._leaves import (
    crc32,
    flatten,
    host_copy,
    is_key,
    leaf_name,
    mismatches,
    prepare,
    restore_plan,
)

__all__ = ["CheckpointMismatchError", "CheckpointWarning", "Checkpointer", "UnsafeStateError"]

FORMAT = "bnjax.checkpoint/1"
_STATE, _MANIFEST = "state", "manifest"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax names a step's directory <step><suffix> until commit


class UnsafeStateError(ValueError):
    """`Checkpointer.save` refused a state with non-finite values or bad BN statistics."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's structure, shapes or dtypes differ from the restore target."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be restored and was skipped."""


def _remove_unfinished(directory: str) -> None:
    """Deletes the tmp directories of saves that never committed (a killed process's).

    Orbax's own clean-up (``cleanup_tmp_directories``) also does this, but in a background
    thread that only the next save waits for; doing it here makes reopening deterministic.
    """
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TMP_SUFFIX in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:
    """Periodic, keep-N, optionally asynchronous orbax checkpoints with verified restores.

    Args:
      directory: where step directories go (created if needed), e.g. ``WORKDIR/checkpoints``.
      max_to_keep: how many of the newest checkpoints to keep (None: all).
      save_interval_steps: `save` writes only when ``step % save_interval_steps == 0``,
        unless ``force=True``.
      async_save: write files in a background thread.
      quarantine: move a checkpoint that fails to restore to ``directory/corrupt/``. Without
        it the bad step stays in place, and `save` skips that step number when it comes again.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     checkpointer = Checkpointer(directory, max_to_keep=2, async_save=False)
      ...     written = checkpointer.save(1, {"w": np.ones(2)})
      ...     try:
      ...         checkpointer.save(2, {"w": np.array([np.nan, 1.0])})
      ...     except UnsafeStateError as error:
      ...         print(error)
      ...     step, state = checkpointer.restore_latest()
      ...     checkpointer.close()
      refusing to checkpoint step 2: w (non-finite)
      >>> written, step, state["w"].tolist()
      (True, 1, [1.0, 1.0])
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        quarantine: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        policies = ocp.checkpoint_managers
        every_n = [
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_decision_policy=policies.AnySavePolicy(every_n),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self.quarantine = quarantine
        _remove_unfinished(self.directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step (not yet verified; `restore_latest` verifies)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (the interval, and a step newer than any)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` (any pytree of arrays and scalars) as `step`; True if it was written.

        Nothing is written (False) when the step is not on the interval (unless `force`) or
        is already saved. Raises UnsafeStateError, naming the leaves or layers, when a floating
        leaf holds NaN/inf or batch-norm statistics are non-finite or negative.
        """
        step = int(step)
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        stored, entries, bad = prepare(state)
        report = validate_statistics(state)
        bad += [
            f"{layer.path}: {problem}"
            for layer in report.layers
            for problem in layer.problems
            if "non-finite" in problem or problem.startswith("negative")
        ]
        if bad:
            shown = "; ".join(bad[:8]) + (f"; ... {len(bad) - 8} more" if len(bad) > 8 else "")
            raise UnsafeStateError(f"refusing to checkpoint step {step}: {shown}")
        manifest = {"format": FORMAT, "step": step, "leaves": entries}
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(stored),
            _MANIFEST: ocp.args.JsonSave(manifest),
        })  # fmt: skip
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int, target: Any = None) -> Any:
        """Restores and verifies `step` (no fallback): like `target`, or raw dicts if None.

        Raises CheckpointMismatchError when the checkpoint does not fit `target`, and other
        errors (FileNotFoundError, ValueError, ...) when it is unreadable or fails its checksums.
        """
        self._manager.wait_until_finished()
        plan = None if target is None else restore_plan(target)
        return self._restore(int(step), plan)

    def restore_latest(self, target: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores and verifies, or None.

        Unreadable steps are skipped with a `CheckpointWarning` (and quarantined); see the
        module docstring. `target` is a pytree like the saved state (arrays, or
        ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) that fixes the structure, dtypes,
        sharding and leaf types of the result; None gives the raw restored dicts.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        plan = None if target is None else restore_plan(target)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, self._restore(step, plan)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # any failure to read means a bad step
                moved = self._quarantine(step)
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} is unusable "
                    f"({type(error).__name__}: {str(error)[:300]}); "
                    + (f"moved to {moved}; " if moved else "")
                    + "falling back to an older checkpoint",
                    CheckpointWarning,
                    stacklevel=2,
                )
        return None

    def _restore(self, step: int, plan) -> Any:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()})
        )
        manifest = restored[_MANIFEST]
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"no valid {_MANIFEST} item (not written by Checkpointer?)")
        if manifest.get("step") != step:
            raise ValueError(f"manifest is for step {manifest.get('step')}, not {step}")
        entries = manifest["leaves"]
        if plan is None:
            state = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore()})
            )[_STATE]
            leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
            names, originals = [leaf_name(path) for path, _ in leaves], [None] * len(leaves)
            leaves = [leaf for _, leaf in leaves]
        else:
            names, originals, abstract, treedef = plan
            self._check_fits(step, entries, names, abstract)
            state = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(jax.tree_util.tree_unflatten(treedef, abstract))
            }))[_STATE]  # fmt: skip
            by_name = {leaf_name(path): leaf for path, leaf in flatten(state)}
            if sorted(by_name) != sorted(names):
                raise ValueError("restored leaves differ from the target's")
            leaves = [by_name[name] for name in names]
        if sorted(names) != sorted(entries):
            raise ValueError("restored leaves differ from the manifest's")
        out = []
        for name, original, leaf in zip(names, originals, leaves, strict=True):
            entry, host = entries[name], host_copy(leaf)
            if [list(np.shape(leaf)), str(leaf.dtype)] != [entry["shape"], entry["dtype"]]:
                raise ValueError(f"leaf {name!r} restored with the wrong shape or dtype")
            if entry["crc32"] is not None and host is not None and crc32(host) != entry["crc32"]:
                raise ValueError(f"leaf {name!r} fails its checksum (corrupt data)")
            if "prng_impl" in entry and (original is None or is_key(original)):
                leaf = jax.random.wrap_key_data(jnp.asarray(leaf), impl=entry["prng_impl"])
            elif isinstance(original, (bool, int, float)):
                leaf = type(original)(np.asarray(leaf).item())
            out.append(leaf)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _check_fits(self, step, entries, names, abstract) -> None:
        problems = mismatches(entries, names, abstract)
        if problems:
            shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit the target "
                f"(a different model or config?): {shown}"
            )

    def _quarantine(self, step: int) -> str | None:
        if not self.quarantine or jax.process_index() != 0:
            return None
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, "corrupt", f"{step}.{time.time_ns()}")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
        except OSError:
            return None
        self._manager.reload()
        return target

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are committed (raises their errors)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
