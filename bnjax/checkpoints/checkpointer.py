"""Orbax checkpoints that survive SIGKILL, corrupt files and non-finite training states.

`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``. A step directory holds two items:

    DIRECTORY/<step>/state/      the state pytree (orbax PyTree format, StandardSave; its
                                 metadata holds every leaf's shape and dtype)
    DIRECTORY/<step>/manifest/   JSON: {"format", "step", "leaves": {"a/b/kernel":
                                 {"crc32": int or null}}}, leaves named by their key path

Guarantees:

- **Atomic saves.** Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
  when complete, so a process killed during a save (SIGKILL included) leaves no step that
  looks complete. Leftover tmp directories are deleted when the next `Checkpointer` opens.
- **Verified restores.** Each leaf's CRC32 is stored at save and checked at restore (orbax
  itself restores flipped bytes silently). `restore_latest` walks back from the newest step:
  a step that fails to restore (missing or truncated files, bad checksum) is reported with
  one `CheckpointWarning` line naming it and moved to ``DIRECTORY/corrupt/``
  (``quarantine=True``, on process 0), so the resumed run can save that step again. A step
  that cannot be moved stays listed but is remembered as corrupt: a later `save` of the same
  step number keeps it if it now reads back intact with the saved state's checksums (a read
  that failed once, say), else replaces it (or raises an OSError naming it if it cannot). A
  checkpoint whose structure, shapes or dtypes differ from the target (a changed model)
  raises `CheckpointMismatchError` instead: that is not corruption. `verify` re-reads a saved
  step and raises `CorruptCheckpointError` unless it restores and passes its checksums.
- **Quiet failures.** Orbax's error logs for a failed read are held back (the warning or
  error says why). The other reads orbax abandons when one fails are finished and collected
  within the call, their reports ("exception was never retrieved", "Event loop is closed",
  errors in collected orbax coroutines) dropped; nothing stays installed after the call
  (`bnjax.checkpoints.orbax_noise.quiet_orbax`), and other reports still print.
- **Failed writes, once.** A save that cannot be written (a full disk, an I/O error) raises
  `CheckpointWriteError` (an OSError) from the call that waits for it (`save` of the next
  step, `wait_until_finished`, `verify`, `close`), naming the step, the cause and the newest
  committed step, which stays intact; orbax's logged tracebacks of that failure are held
  back while the Checkpointer is open. The unfinished step never looks complete (see atomic saves).
- **Only finite states.** `save` raises `UnsafeStateError` (and writes nothing) for a state
  with a NaN/inf in any floating leaf, or batch-norm statistics that
  `bnjax.lifecycle.validate_statistics` finds non-finite or negative. The previous
  checkpoints stay the last good ones.
- **Exact round trip.** Leaves come back with their dtype and bits (bf16, fp16, float64 numpy
  arrays, integers, bools). numpy leaves come back as numpy, jax arrays as jax arrays (with
  the target's sharding), Python scalars as Python scalars. Zero-size arrays are not
  supported (orbax refuses them).

PRNG keys: orbax stores a typed key (``jax.random.key``) leaf as its key data with its
implementation's name and restores it as a typed key (with or without a target); its checksum
covers the key data. Raw uint32 keys (``jax.random.PRNGKey``) are plain arrays. Either way the
restored key is bitwise the saved one.

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3, save_interval_steps=100)
    restored = ckpt.restore_latest(state)          # state: a template with the right shapes
    step, state = restored if restored else (0, state)
    ...
    ckpt.save(step, state)                         # saves when step % 100 == 0 (async)
    ckpt.save(final_step, state, force=True)
    ckpt.verify(final_step)                        # waits, re-reads, checks the checksums
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
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

from bnjax.checkpoints.checksum_manifest import (
    OLD_FORMATS,
    check_checksums,
    manifest_checksums,
    manifest_of,
    mismatches,
    prepare,
    restore_target,
    target_types,
)
from bnjax.checkpoints.orbax_noise import (
    hold_back_save_errors,
    quiet_orbax,
    release_save_errors,
    root_cause,
)
from bnjax.lifecycle.validation import validate_statistics

__all__ = [
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpointer",
    "CorruptCheckpointError",
    "UnsafeStateError",
]

_STATE, _MANIFEST = "state", "manifest"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax names a step's directory <step><suffix> until commit


class UnsafeStateError(ValueError):
    """`Checkpointer.save` refused a state with non-finite values or bad BN statistics."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's structure, shapes or dtypes differ from the restore target."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the older steps are intact."""


def _write_failure(error: BaseException) -> str:
    """Why a write failed, on one line: the operating system's words where there are some
    (tensorstore reports ENOSPC inside a long message), else the root cause."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return f"{type(cause).__name__}: [Errno {cause.errno}] {cause.strerror}"
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(error).split())
    if "No space left on device" in text:
        return "No space left on device (ENOSPC)"
    return root_cause(error)


class CheckpointWarning(UserWarning):
    """A checkpoint could not be restored and was skipped."""


class CorruptCheckpointError(ValueError):
    """A checkpoint step is missing, unreadable or fails its checksums (`Checkpointer.verify`)."""


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
        it (or when the move fails) the bad step stays in place until a `save` of the same
        step number replaces it.
      read_only: only restore and verify: nothing in `directory` is created, moved or
        deleted (no quarantine, no clean-up of unfinished saves), and `save` raises.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     checkpointer = Checkpointer(directory, max_to_keep=2, async_save=False)
      ...     written = checkpointer.save(1, {"w": np.ones(2)})
      ...     try:
      ...         checkpointer.save(2, {"w": np.array([np.nan, 1.0])})
      ...     except UnsafeStateError as error:
      ...         print(error)
      ...     checkpointer.verify(1)                        # raises unless readable and intact
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
        read_only: bool = False,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.quarantine = quarantine and not read_only
        self.read_only = read_only
        self._interval = save_interval_steps
        self._corrupt: set[int] = set()  # steps that failed to restore and are still listed
        self._pending: int | None = None  # the step of a save not yet known to be committed
        if read_only:
            if not os.path.isdir(self.directory):
                raise FileNotFoundError(f"No checkpoint directory {self.directory!r}.")
            options = ocp.CheckpointManagerOptions(
                read_only=True,
                save_interval_steps=0,
                max_to_keep=None,
                create=False,
                cleanup_tmp_directories=False,
            )
        else:
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
            _remove_unfinished(self.directory)
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _MANIFEST: ocp.JsonCheckpointHandler()}
        # Read-only: orbax notes that it adjusted the options for read-only use; drop only that.
        with quiet_orbax(keep=lambda record: not read_only or "read only" not in str(record.msg)):
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        # A failed save is raised to the caller, once: orbax's logs of it are dropped while
        # this Checkpointer is open (until `close`, or until it is collected unclosed).
        self._release_save_errors = None
        if not read_only:
            hold_back_save_errors()
            self._release_save_errors = weakref.finalize(self, release_save_errors)

    def latest_step(self) -> int | None:
        """The newest committed step (not yet verified; `restore_latest` verifies)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (the interval, and a step newer than any).

        Steps found corrupt (and not quarantined) do not count: their numbers can be saved
        again, and so can the steps between the last good one and them.
        """
        step = int(step)
        steps = self._manager.all_steps()
        corrupt = self._corrupt & set(steps)
        if not corrupt:
            return self._manager.should_save(step)
        good = [s for s in steps if s not in corrupt]
        on_interval = step % self._interval == 0 or self._manager.reached_preemption(step)
        return on_interval and (not good or step > max(good))

    def save(
        self,
        step: int,
        state: Any,
        *,
        force: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> bool:
        """Saves `state` (any pytree of arrays and scalars) as `step`; True if it was written.

        `scalars` ({name: number}, e.g. the step's training loss) go into the step's manifest
        and come back from `scalars`: a log can be completed from the checkpoint when the
        process died between the save and its own write. Nothing is written (False) when the
        step is not on the interval (unless `force`) or is already saved. A step that this
        Checkpointer found corrupt is replaced (its directory deleted first; OSError if that
        fails). Raises UnsafeStateError, naming the leaves or layers, when a floating leaf
        holds NaN/inf or batch-norm statistics are non-finite or negative.
        """
        if self.read_only:
            raise ValueError(f"Checkpointer of {self.directory} is read_only: cannot save.")
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps() and step not in self._corrupt:
            return False
        stored, checksums, bad = prepare(state)
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
        if step in self._manager.all_steps():
            if self._holds(step, checksums):  # unreadable once, intact and the same state now
                self._corrupt.discard(step)
                return False
            self._discard(step)
        manifest = manifest_of(step, checksums)
        if scalars:
            manifest["scalars"] = {name: float(value) for name, value in scalars.items()}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(stored),
                _MANIFEST: ocp.args.JsonSave(manifest),
            }
        )
        written = self._writing(step, lambda: self._manager.save(step, args=args, force=True))
        self._pending = step if written else self._pending
        return bool(written)

    def _writing(self, step: int | None, write) -> Any:
        """`write()` (an orbax call that writes or waits for writes); a failure becomes
        CheckpointWriteError naming the step that was being written."""
        failed = self._pending if self._pending is not None else step
        try:
            result = write()
        except Exception as error:
            self._pending = None
            newest = [s for s in self._committed() if s != failed]
            raise CheckpointWriteError(
                f"checkpoint step {failed} could not be written to {self.directory} "
                f"({_write_failure(error)}); the newest committed step is "
                f"{max(newest) if newest else 'none'}, intact. Free space (or fix the disk), "
                "then re-run the same command: it resumes from there."
            ) from error
        self._pending = None if step is None else self._pending
        return result

    def _committed(self) -> list[int]:
        """The steps whose directories have their final name (best effort, for messages)."""
        try:
            return [int(name) for name in os.listdir(self.directory) if name.isdigit()]
        except OSError:
            return []

    def _wait(self) -> None:
        """Waits for the pending save (CheckpointWriteError if it failed)."""
        self._writing(None, self._manager.wait_until_finished)

    def _holds(self, step: int, checksums: dict[str, int | None]) -> bool:
        """Whether the listed `step` now reads back intact with exactly these checksums.

        A step that failed to restore (say, a file that could not be opened) and could not be
        moved aside may hold the very state being saved again (training is deterministic):
        then it is kept, instead of failing on a directory that cannot be removed. Leaves
        without a checksum (spanning processes) cannot be compared: never the same.
        """
        try:
            with quiet_orbax():
                manifest = self._manifest(step)
            saved = manifest_checksums(manifest, step)
            if saved != checksums or None in saved.values():
                return False
            self._attempt(step, None)  # every leaf read back and checked against `saved`
        except Exception:  # unreadable still: it is replaced
            return False
        return True

    def _discard(self, step: int) -> None:
        """Deletes a corrupt step's directory, so that the step can be saved again."""
        self._wait()
        path = os.path.join(self.directory, str(step))
        if jax.process_index() == 0:
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise OSError(
                    f"cannot save step {step}: {path} holds a corrupt checkpoint that cannot "
                    f"be removed ({root_cause(error)}); remove or rename it, or fix the "
                    f"directory's permissions"
                ) from error
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"bnjax_checkpoint_discard_{step}")
        self._corrupt.discard(step)
        self._manager.reload()

    def restore(self, step: int, target: Any = None) -> Any:
        """Restores and verifies `step` (no fallback): like `target`, or raw dicts if None.

        Raises CheckpointMismatchError when the checkpoint does not fit `target`, and other
        errors (FileNotFoundError, ValueError, ...) when it is unreadable or fails its checksums
        (orbax's logs and tracebacks of the failed attempt are held back; the error says why).
        """
        self._wait()
        plan = None if target is None else (target, restore_target(target))
        return self._attempt(int(step), plan)

    def scalars(self, step: int) -> dict[str, float]:
        """The `scalars` saved with `step` ({} when none were, or the manifest is unreadable)."""
        self._wait()
        try:
            with quiet_orbax():
                manifest = self._manifest(int(step))
        except Exception:  # a missing scalar is reported by its absence, not by a crash
            return {}
        scalars = manifest.get("scalars") if isinstance(manifest, dict) else None
        return dict(scalars) if isinstance(scalars, dict) else {}

    def verify(self, step: int, target: Any = None) -> None:
        """Raises CorruptCheckpointError unless `step` is saved, readable and intact.

        Waits for pending saves, then reads the step back from disk (every leaf, checked
        against the checksums taken at save time). Pass `target` (the state or
        ``jax.eval_shape`` of it) where leaves span several processes or devices; without it
        the leaves are read to the default device. A corrupt step is remembered, so `save` of
        the same step replaces it.
        """
        step = int(step)
        self._wait()
        self._manager.reload()
        if step not in self._manager.all_steps():
            raise CorruptCheckpointError(
                f"checkpoint step {step} is not in {self.directory} "
                f"(steps: {self.all_steps()}): never saved, or since removed"
            )
        plan = None if target is None else (target, restore_target(target))
        try:
            self._attempt(step, plan)
        except CheckpointMismatchError:
            raise
        except Exception as error:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is unusable ({root_cause(error)})"
            ) from None

    def restore_latest(self, target: Any = None) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores and verifies, or None.

        Unreadable steps are skipped with a `CheckpointWarning` (and quarantined); see the
        module docstring. `target` is a pytree like the saved state (arrays, or
        ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) that fixes the structure, dtypes,
        sharding and leaf types of the result; None gives the raw restored dicts.
        """
        self._wait()
        self._manager.reload()
        plan = None if target is None else (target, restore_target(target))
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, self._attempt(step, plan)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # any failure to read means a bad step
                reason = root_cause(error)
            moved = self._quarantine(step)
            warnings.warn(
                f"checkpoint step {step} in {self.directory} is unusable ({reason}); "
                + (f"moved to {moved}; " if moved else "")
                + "falling back to an older checkpoint",
                CheckpointWarning,
                stacklevel=2,
            )
        return None

    def _attempt(self, step: int, plan) -> Any:
        """`_restore`, quietly; a step that fails (not a mismatch) is remembered as corrupt."""
        try:
            with quiet_orbax():
                return self._restore(step, plan)
        except CheckpointMismatchError:
            raise
        except Exception:
            self._corrupt.add(step)
            raise

    def _manifest(self, step: int) -> Any:
        args = ocp.args.Composite(**{_MANIFEST: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[_MANIFEST]

    def _restore(self, step: int, plan) -> Any:
        manifest = self._manifest(step)
        if isinstance(manifest, dict) and manifest.get("format") in OLD_FORMATS:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} is in the older format "
                f"{manifest['format']!r}; read it with the bnjax version that wrote it"
            )
        checksums = manifest_checksums(manifest, step)
        if plan is None:
            args = ocp.args.StandardRestore()
        else:
            target, abstract = plan
            metadata = self._manager.item_metadata(step)[_STATE]
            if metadata is None:  # orbax returns None where it cannot read the metadata
                raise FileNotFoundError(f"{_STATE}/_METADATA of step {step} is unreadable")
            self._check_fits(step, metadata.tree, abstract)
            args = ocp.args.StandardRestore(abstract)
        state = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
        check_checksums(state, checksums)
        return state if plan is None else target_types(target, state)

    def _check_fits(self, step, saved, abstract) -> None:
        problems = mismatches(saved, abstract)
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
        self._corrupt.discard(step)
        self._manager.reload()
        return target

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are committed (raises their errors)."""
        self._wait()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (even when the save failed)."""
        try:
            self._wait()
        finally:
            try:
                self._manager.close()
            finally:
                if self._release_save_errors is not None:
                    self._release_save_errors()  # once: a finalizer runs at most once

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
