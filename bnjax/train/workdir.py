"""The workdir of a run, for both applications (``scripts/train.py`` and the study,
``scripts/batch_study.py``): its lock, its saved config, the resume check, atomic writes.

- **One run per workdir.** `WorkdirLock` holds an exclusive ``flock`` on ``WORKDIR/.lock``
  (one lock file per process of a multi-process run) while the run lives. A second run on the
  same workdir stops at once with `WorkdirBusyError` instead of interleaving its checkpoints
  and metric lines with the first. The kernel drops the lock when the process dies, SIGKILL
  included, so a killed run never leaves a stale lock behind. Both applications take the same
  lock, so a study and a training run never share a workdir either; `check_workdir` also
  refuses a workdir that holds the other application's config.
- **The resolved config.** ``WORKDIR/config.json`` holds the config the run trained with.
  Resuming with settings that change what is trained (learning rate, batch size, seed, sampler,
  number of steps: the cosine schedule depends on it, ...) is refused with `ConfigChangedError`
  naming each change, unless the caller allows it; settings that only change bookkeeping
  (logging, evaluation and checkpoint intervals, devices) are reported and accepted. Each
  application names its own bookkeeping keys (`BOOKKEEPING_KEYS` for training, the study's
  presentation keys for the study) and its config file (``config.json``,
  ``study_config.json``); the saving, reading and comparing are the same.
- **Atomic writes.** `write_atomically` (write, flush, fsync, rename, fsync of the directory)
  writes every file a run rewrites whole: the configs, the study's results.csv, tables and
  artifacts. A kill, a power cut or a full disk leaves the previous version whole.
- **A usable workdir, or one line saying why not.** `check_workdir` refuses an empty path, a
  file, and a directory where the run keeps a file (``.lock``, ``config.json``,
  ``metrics.jsonl``) or the reverse (``checkpoints``) with `WorkdirError`, before anything is
  built (the study's entries likewise, `STUDY`). A lock that cannot be created (a read-only
  workdir) raises `WorkdirReadOnlyError`: the loop then still reports a finished run, writing
  nothing. A ``config.json`` that is not a JSON object raises `ConfigFileError` naming the
  file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Collection, Mapping
from typing import Any

CONFIG_FILE = "config.json"
STUDY_CONFIG_FILE = "study_config.json"

# The applications that keep a workdir (`check_workdir`'s `application`).
TRAINING = "training run"
STUDY = "study"

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
        # How the averaged model is evaluated, not what is trained.
        "ema_statistics",
        "ema_recalibration_batches",
    }
)

# Keys added to the training config after runs were saved without them: a saved config that
# lacks one trained with the value given here (the behaviour before the key existed), so
# resuming such a run with that value is no change.
ADDED_KEY_DEFAULTS = {
    "conv": "plain",
    "ema_decay": 0.0,
    "ema_statistics": "average",
    "ema_recalibration_batches": 8,
}


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


# What each application keeps in its workdir: {name: (is a directory, what it is)}.
_ENTRIES = {
    TRAINING: {
        ".lock": (False, "lock"),
        CONFIG_FILE: (False, "config"),
        "metrics.jsonl": (False, "metric log"),
        "checkpoints": (True, "checkpoints"),
    },
    STUDY: {
        ".lock": (False, "lock"),
        STUDY_CONFIG_FILE: (False, "config"),
        "results.csv": (False, "results"),
        "table.md": (False, "table"),
        "verdicts.md": (False, "verdicts"),
        "artifacts": (True, "per-run artifacts"),
        "plots": (True, "plots"),
    },
}
# The file that marks a workdir as an application's: another application refuses it.
_CONFIG_FILES = {TRAINING: CONFIG_FILE, STUDY: STUDY_CONFIG_FILE}


def check_workdir(workdir, application: str = TRAINING) -> None:
    """Raises WorkdirError, naming the path and the fix, unless `workdir` can hold a run of
    `application` (`TRAINING` or `STUDY`): a non-empty path that is a directory (or can be
    created as one), that holds no other application's config (a study's results and a
    training run's checkpoints would mix), and whose entries (for training: lock, config,
    metric log, checkpoints) are of the right kind (file or directory) where they exist.

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
    for other, name in _CONFIG_FILES.items():
        if other != application and os.path.lexists(os.path.join(workdir, name)):
            raise WorkdirError(
                f"workdir {workdir!r} holds a {other} ({name}), not a {application}: the two "
                "would mix their files; choose another --workdir"
            )
    for name, (directory, what) in _ENTRIES[application].items():
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


def write_atomically(path: str, content: str | bytes) -> None:
    """Writes `content` (text, or bytes) to `path` atomically: into ``path.tmp``, flushed and
    synced to disk, renamed over `path`, then the directory synced (so the rename itself
    survives a power cut). A kill, a power cut or a full disk leaves the old file whole (or no
    file), never a truncated one; on failure the temporary file is removed and the error raised.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "table.md")
      ...     write_atomically(path, "# Results\\n")
      ...     print(open(path).read(), end="", flush=True)
      ...     print(os.listdir(directory))
      # Results
      ['table.md']
    """
    temporary = path + ".tmp"
    try:
        # newline="": text is written as given (csv's \r\n line ends stay as they are).
        mode, options = ("wb", {}) if isinstance(content, bytes) else ("w", {"newline": ""})
        with open(temporary, mode, **options) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _sync_directory(os.path.dirname(path) or ".")


def _sync_directory(directory: str) -> None:
    """fsyncs `directory` (its entry for a renamed file); a file system that cannot sync a
    directory (some network ones refuse) keeps the rename, only less durably."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_config(config, workdir: str, name: str = CONFIG_FILE) -> str:
    """Writes the resolved `config` (a ConfigDict or a dict) to ``workdir/name`` as indented
    JSON with sorted keys (`write_atomically`); returns the path."""
    path = os.path.join(workdir, name)
    os.makedirs(workdir, exist_ok=True)
    write_atomically(path, json.dumps(_plain(config), indent=2, sort_keys=True) + "\n")
    return path


def load_config(workdir: str, name: str = CONFIG_FILE) -> dict[str, Any] | None:
    """The config saved in ``workdir/name``, or None when there is none. Any JSON object
    reads back, whatever its layout (a study's ``study_config.json`` written before
    `save_config` was shared: indented by 1, without the presentation keys, still resumes).

    Raises ConfigFileError, naming the file, when it is not valid JSON or not an object.
    """
    path = os.path.join(workdir, name)
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


def config_changes(
    saved: dict[str, Any],
    config,
    bookkeeping_keys: Collection[str] = BOOKKEEPING_KEYS,
    added_defaults: Mapping[str, Any] = ADDED_KEY_DEFAULTS,
) -> tuple[list[str], list[str]]:
    """(changes to what is trained, changes to `bookkeeping_keys`), each as
    'config.key: old -> new' ('(unset)' for a key one side lacks; a key of `added_defaults`
    that `saved` lacks counts as saved with its value there).

    Example:
      >>> changes = config_changes({"learning_rate": 0.05, "log_every": 50},
      ...                          {"learning_rate": 0.1, "log_every": 10})
      >>> changes
      (['config.learning_rate: 0.05 -> 0.1'], ['config.log_every: 50 -> 10'])
    """
    current = _plain(config)
    training, bookkeeping = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, added_defaults.get(key, "(unset)")), current.get(key, "(unset)")
        if old != new:
            line = f"config.{key}: {old!r} -> {new!r}"
            (bookkeeping if key in bookkeeping_keys else training).append(line)
    return training, bookkeeping


# What a training run's user can do about a refused config change.
ALLOW_CHANGE_REMEDY = (
    "Use the saved values, a new --workdir, or pass --allow_config_change to continue with the "
    "new ones (allow_config_change=True in Python)."
)


def check_resume_config(
    saved: dict[str, Any] | None,
    config,
    *,
    allow_changes: bool,
    bookkeeping_keys: Collection[str] = BOOKKEEPING_KEYS,
    remedy: str = ALLOW_CHANGE_REMEDY,
) -> list[str]:
    """The lines to report when resuming `config` over a run that trained with `saved`.

    Raises ConfigChangedError naming every change outside `bookkeeping_keys` (old -> new),
    then `remedy` (what the user can do), unless `allow_changes`; then (and for bookkeeping
    changes) the changes are returned for the caller to print.

    Example (the study's bookkeeping keys):
      >>> check_resume_config({"num_seeds": 2, "plots": True}, {"num_seeds": 2, "plots": False},
      ...                     allow_changes=False, bookkeeping_keys=("plots",))
      ['config.plots: True -> False']
    """
    if saved is None:
        return []
    training, bookkeeping = config_changes(saved, config, bookkeeping_keys)
    if training and not allow_changes:
        raise ConfigChangedError(
            "resuming with a different config would silently change the run: "
            + "; ".join(training)
            + ". "
            + remedy
        )
    return training + bookkeeping
