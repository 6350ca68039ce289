"""What a training run keeps in its workdir besides checkpoints and metrics: a lock and its config.

- **One run per workdir.** `WorkdirLock` holds an exclusive ``flock`` on ``WORKDIR/.lock``
  (one lock file per process of a multi-process run) while the run lives. A second run on the
  same workdir stops at once with `WorkdirBusyError` instead of interleaving its checkpoints
  and metric lines with the first. The kernel drops the lock when the process dies, SIGKILL
  included, so a killed run never leaves a stale lock behind.
- **The resolved config.** ``WORKDIR/config.json`` holds the config the run trained with.
  Resuming with settings that change what is trained (learning rate, batch size, seed, sampler,
  number of steps: the cosine schedule depends on it, ...) is refused with `ConfigChangedError`
  naming each change, unless the caller allows it; settings that only change bookkeeping
  (logging, evaluation and checkpoint intervals, devices) are reported and accepted.
- **A usable workdir, or one line saying why not.** `check_workdir` refuses an empty path, a
  file, and a directory where the run keeps a file (``.lock``, ``config.json``,
  ``metrics.jsonl``) or the reverse (``checkpoints``) with `WorkdirError`, before anything is
  built. A lock that cannot be created (a read-only workdir) raises `WorkdirReadOnlyError`:
  the loop then still reports a finished run, writing nothing. A ``config.json`` that is not
  a JSON object raises `ConfigFileError` naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from typing import Any

CONFIG_FILE = "config.json"

# Keys whose change on resume leaves the trained trajectory as it is (up to the rounding of a
# different device layout): reported, never refused.
BOOKKEEPING_KEYS = frozenset(
    {
        "data_dir",
        "eval_batch_size",
        "parallel",
        "num_devices",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "progress",
        "telemetry",
    }
)


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir's lock."""


class ConfigChangedError(ValueError):
    """A resumed run's config changes what is trained; the message names each change."""


class WorkdirError(ValueError):
    """The workdir cannot hold a run (empty, a file, a file where a directory belongs...)."""


class WorkdirReadOnlyError(WorkdirError):
    """Nothing can be written in the workdir (no permission, a read-only file system)."""


class ConfigFileError(ValueError):
    """``config.json`` is not the JSON object a run writes (edited or damaged)."""


# What the run keeps in its workdir, and whether each is a directory.
_ENTRIES = {
    ".lock": (False, "lock"),
    CONFIG_FILE: (False, "config"),
    "metrics.jsonl": (False, "metric log"),
    "checkpoints": (True, "checkpoints"),
}


def check_workdir(workdir) -> None:
    """Raises WorkdirError, naming the path and the fix, unless `workdir` can hold a run: a
    non-empty path that is a directory (or can be created as one) whose lock, config, metric
    log and checkpoints are of the right kind (file or directory) where they exist.

    Example:
      >>> check_workdir("")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      bnjax.train.workdir.WorkdirError: the workdir is empty: pass --workdir=DIR, ...
    """
    workdir = os.fspath(workdir)
    if not workdir.strip():
        raise WorkdirError(
            "the workdir is empty: pass --workdir=DIR, the directory that holds (or will "
            "hold) the run"
        )
    existing = os.path.abspath(workdir)
    while not os.path.lexists(existing):  # the first existing path on the way up
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(
            f"workdir {workdir!r}: {existing} is a file, not a directory; choose another --workdir"
        )
    for name, (directory, what) in _ENTRIES.items():
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and os.path.isdir(path) != directory:
            kind = "directory" if os.path.isdir(path) else "file"
            raise WorkdirError(
                f"{path} is a {kind}, where the run keeps its {what}; move it away or choose "
                "another --workdir"
            )


class WorkdirLock:
    """An exclusive lock on a workdir for the life of a run (a context manager).

    Args:
      workdir: the run's directory (created if needed).
      process_index: this process's index in a multi-process run; each process locks its own
        file, so the processes of one run share the workdir and two runs never do.

    Example:
      >>> import tempfile
      >>> workdir = tempfile.mkdtemp()
      >>> with WorkdirLock(workdir):
      ...     try:
      ...         WorkdirLock(workdir).acquire()
      ...     except WorkdirBusyError as error:
      ...         print(str(error).split(" (")[0])
      another run
    """

    def __init__(self, workdir: str, process_index: int = 0):
        name = ".lock" if process_index == 0 else f".lock.process{process_index}"
        self.path = os.path.join(workdir, name)
        self._file = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises WorkdirBusyError naming the process that holds it
        (WorkdirReadOnlyError when the lock file cannot be created)."""
        workdir = os.path.dirname(self.path)
        try:
            os.makedirs(workdir, exist_ok=True)
            handle = open(self.path, "a+")  # held open (and locked) for the life of the run
        except OSError as error:
            raise self._read_only(error) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise WorkdirBusyError(
                f"another run (process {holder}) is using this workdir ({self.path} is locked); "
                "wait for it to finish, stop it, or choose another --workdir."
            ) from None
        try:  # a writable lock in a directory that is not (chmod a-w WORKDIR) is read-only too
            with tempfile.TemporaryFile(dir=workdir):
                pass
        except OSError as error:
            handle.close()
            raise self._read_only(error) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def _read_only(self, error: OSError) -> OSError:
        """WorkdirReadOnlyError for a refused write (no permission, read-only file system);
        `error` itself for any other failure."""
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            return error
        return WorkdirReadOnlyError(
            f"cannot write in the workdir {os.path.dirname(self.path)} ({error.strerror}: "
            f"{error.filename or self.path}); a finished run is still reported, anything else "
            "needs write access: fix the permissions or choose another --workdir"
        )

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self if self._file is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _plain(config) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), so saved and current compare equal."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def save_config(config, workdir: str) -> str:
    """Writes the resolved `config` to ``workdir/config.json`` (atomically); returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    os.makedirs(workdir, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(_plain(config), handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)
    return path


def load_config(workdir: str) -> dict[str, Any] | None:
    """The config saved in `workdir`, or None when there is none.

    Raises ConfigFileError, naming the file, when it is not valid JSON or not an object.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigFileError(
            f"{path} is not valid JSON ({error}); it holds the config the run trained with: "
            "restore it, or delete it to resume without checking the config"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigFileError(
            f"{path} holds a JSON {type(saved).__name__}, not the config object a run writes; "
            "restore it, or delete it to resume without checking the config"
        )
    return saved


def config_changes(saved: dict[str, Any], config) -> tuple[list[str], list[str]]:
    """(changes to what is trained, changes to bookkeeping), each as 'config.key: old -> new'.

    Example:
      >>> changes = config_changes({"learning_rate": 0.05, "log_every": 50},
      ...                          {"learning_rate": 0.1, "log_every": 10})
      >>> changes
      (['config.learning_rate: 0.05 -> 0.1'], ['config.log_every: 50 -> 10'])
    """
    current = _plain(config)
    training, bookkeeping = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if old != new:
            line = f"config.{key}: {old!r} -> {new!r}"
            (bookkeeping if key in BOOKKEEPING_KEYS else training).append(line)
    return training, bookkeeping


def check_resume_config(saved: dict[str, Any] | None, config, *, allow_changes: bool) -> list[str]:
    """The lines to report when resuming `config` over a run that trained with `saved`.

    Raises ConfigChangedError naming every change to what is trained, unless `allow_changes`;
    then (and for bookkeeping changes) the changes are returned for the caller to print.
    """
    if saved is None:
        return []
    training, bookkeeping = config_changes(saved, config)
    if training and not allow_changes:
        raise ConfigChangedError(
            "resuming with a different config would silently change the run: "
            + "; ".join(training)
            + ". Use the saved values, a new --workdir, or pass --allow_config_change to "
            "continue with the new ones (allow_config_change=True in Python)."
        )
    return training + bookkeeping
