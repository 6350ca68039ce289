"""Orbax's noise about failures that the caller reports anyway, held back for one call only.

A restore that fails in one read: orbax runs its reads as asyncio tasks on an event loop of
its own (``orbax.checkpoint._src.asyncio_utils.run_sync``), and when one read fails it raises
and closes that loop with the other reads still pending. Left alone, those abandoned reads
report later and from elsewhere, long after the failure was handled: in tensorstore's threads
("Event loop is closed", when a read finishes after its loop closed), as coroutines that fail
when they are collected, and as tasks or futures that asyncio logs ("destroyed but it is
pending", "exception was never retrieved") with a traceback.

`quiet_orbax` scopes everything it does to its ``with`` block:

- absl and asyncio log records are held back; replayed (those `keep` accepts) on success,
  dropped on failure (the caller says what failed, in one line);
- the event loops created inside the block settle before they close: the reads a failure
  abandoned are waited for (at most `SETTLE_SECONDS`, then cancelled) and their errors
  retrieved, so they finish inside the block instead of reporting after it (through a
  temporary event loop policy, on Python < 3.14; loops orbax makes with uvloop close as
  they would);
- after a failure, ``gc.collect()`` runs inside the block, so what is left of the abandoned
  reads is collected (and its reports dropped) there;
- ``sys.unraisablehook``, the asyncio logger's filters and the event loop policy are put back
  as they were when the block exits, error or not. The error reaches the caller unchanged,
  traceback included.

Saves fail the same way: a write that fails in orbax's background threads (a full disk) is
logged there with its traceback, several times, then raised to the thread that waits for the
save. `hold_back_save_errors` drops those logs while a writing
`bnjax.checkpoints.Checkpointer` is open (it raises the error once); `release_save_errors`
undoes it when the last one closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator

__all__ = ["hold_back_save_errors", "quiet_orbax", "release_save_errors", "root_cause"]

_NOISY_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; failed tasks through asyncio
_LIBS = ("orbax", "tensorstore")  # whose leftovers a failed restore silences

# Event loop policies, through which the loops orbax creates are made to settle, are deprecated
# from Python 3.14 (and go in 3.16): there only the collection inside the block remains.
_SETTLING = sys.version_info < (3, 14)

SETTLE_SECONDS = 30.0
"""How long a closing event loop waits for the reads a failure abandoned before cancelling
them: local reads finish in milliseconds; the bound only keeps a hung read from hanging."""


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's reports of the orbax reads that a failed restore abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "never retrieved" not in text and "destroyed but it is pending" not in text:
            return True
        trace = record.exc_info[2] if record.exc_info else None
        files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(trace)]
        return not any(library in place for library in _LIBS for place in (text, *files))


_LEFTOVERS = _OrbaxLeftovers()


def _leftover(unraisable) -> bool:
    """An error raised by orbax reads that a failed restore abandoned, where nothing can
    catch it: in tensorstore's threads, or when an abandoned coroutine is collected."""
    trace = list(traceback.walk_tb(unraisable.exc_traceback))
    if isinstance(unraisable.exc_value, RuntimeError) and trace:
        first = trace[0][0].f_code.co_name  # a read finishing after its event loop closed
        if first == "call_soon_threadsafe" and "Event loop is closed" in str(unraisable.exc_value):
            return True
    return any(library in frame.f_code.co_filename for frame, _ in trace for library in _LIBS)


def _hushed(hook):
    """`hook` (a ``sys.unraisablehook``) without the reports `_leftover` recognises."""

    def hushed(unraisable) -> None:
        if not _leftover(unraisable):
            hook(unraisable)

    return hushed


async def _finish(tasks: set[asyncio.Task]) -> None:
    """Waits for `tasks` (cancelling those still running after `SETTLE_SECONDS`) and
    retrieves their errors, so that none is reported as "never retrieved"."""
    _, late = await asyncio.wait(tasks, timeout=SETTLE_SECONDS)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=1.0)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Runs `loop` until the tasks left on it are done (orbax closes its loop right after a
    failed read, with the other reads pending)."""
    for _ in range(8):  # a finishing task may start others; a few rounds settle them
        if loop.is_closed() or loop.is_running():
            return
        pending = asyncio.all_tasks(loop)
        if not pending:
            return
        loop.run_until_complete(_finish(pending))


class _SettlingPolicy(asyncio.AbstractEventLoopPolicy):
    """The policy in place before, whose new event loops settle before they close."""

    def __init__(self, previous: asyncio.AbstractEventLoopPolicy):
        self._previous = previous

    def get_event_loop(self):
        return self._previous.get_event_loop()

    def set_event_loop(self, loop) -> None:
        self._previous.set_event_loop(loop)

    def new_event_loop(self):
        loop = self._previous.new_event_loop()
        close = loop.close

        def settle_then_close() -> None:
            try:
                _settle(loop)
            finally:
                close()

        try:
            loop.close = settle_then_close
        except AttributeError:  # a compiled loop class (uvloop): it closes as it would
            pass
        return loop

    # The child watcher of Unix policies (Python < 3.14): the previous policy's.
    def get_child_watcher(self):
        return self._previous.get_child_watcher()

    def set_child_watcher(self, watcher) -> None:
        self._previous.set_child_watcher(watcher)


def _collect_leftovers() -> None:
    """Collects what a failed restore abandoned, without its reports: coroutines never
    awaited (warnings) and errors in collected coroutines (``sys.unraisablehook``)."""
    hook = sys.unraisablehook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.unraisablehook = lambda unraisable: None
        try:
            gc.collect()
        finally:
            sys.unraisablehook = hook


class _Hold(logging.Filter):
    """Keeps every record it sees (and lets none through)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def quiet_orbax(keep: Callable[[logging.LogRecord], bool] = lambda record: True) -> Iterator[None]:
    """A block of orbax calls that fails quietly: one error for the caller, no log spam.

    Inside the block, absl and asyncio log records are held back, and unraisable reports of
    orbax or tensorstore leftovers ("Event loop is closed", errors of collected orbax
    coroutines) are dropped; other unraisable errors still reach the hook in place before.
    On success the held records that `keep` accepts are replayed, except asyncio's reports
    of orbax leftovers ("never retrieved", "destroyed but it is pending"); on failure they
    are all dropped, and the abandoned reads are finished and collected before the error
    leaves the block. On exit the unraisable hook, the loggers' filters and the event loop
    policy are the ones before.

    Example:
      >>> import sys
      >>> hook = sys.unraisablehook
      >>> try:
      ...     with quiet_orbax():
      ...         raise OSError("a truncated file")
      ... except OSError as error:
      ...     print(error, error.__traceback__ is not None, sys.unraisablehook is hook)
      a truncated file True True
    """
    hold, loggers = _Hold(), [logging.getLogger(name) for name in _NOISY_LOGGERS]
    previous_hook, hook = sys.unraisablehook, _hushed(sys.unraisablehook)
    previous_policy = asyncio.get_event_loop_policy() if _SETTLING else None
    policy = _SettlingPolicy(previous_policy) if _SETTLING else None
    for logger in loggers:
        logger.addFilter(hold)
    sys.unraisablehook = hook
    if policy is not None:
        asyncio.set_event_loop_policy(policy)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        _collect_leftovers()
        raise
    finally:
        # Put back only what is still ours (another thread may have replaced it since).
        if policy is not None and asyncio.get_event_loop_policy() is policy:
            asyncio.set_event_loop_policy(previous_policy)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous_hook
        for logger in loggers:
            logger.removeFilter(hold)
        if not failed:
            for record in hold.records:
                if keep(record) and _LEFTOVERS.filter(record):
                    logging.getLogger(record.name).handle(record)


# Where orbax logs a failed background save before raising it to the thread that waits.
_SAVE_FAILURE_LOGS = ("future.py", "async_checkpointer.py", "checkpoint_manager.py")


class _OrbaxSaveErrors(logging.Filter):
    """Drops orbax's error logs of a failed background save (raised to the caller anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not (
            record.levelno >= logging.ERROR
            and "/orbax/" in path
            and path.rsplit("/", 1)[-1] in _SAVE_FAILURE_LOGS
        )


_SAVE_ERRORS = _OrbaxSaveErrors()
_save_error_holders = 0  # how many open writers hold back save errors
_save_error_lock = threading.Lock()


def hold_back_save_errors() -> None:
    """Drops orbax's logged tracebacks of failed saves until `release_save_errors`.

    Only the error records orbax writes from its futures, async checkpointer and checkpoint
    manager, which are the failures that `wait_until_finished` (or the next save) raises.
    A save's failure is logged in orbax's background threads at any time until it is waited
    for, so this spans a writer's life, not one call: each call is matched by one
    `release_save_errors`, and the filter goes with the last.
    """
    global _save_error_holders
    with _save_error_lock:
        if _save_error_holders == 0:
            logging.getLogger("absl").addFilter(_SAVE_ERRORS)
        _save_error_holders += 1


def release_save_errors() -> None:
    """Undoes one `hold_back_save_errors`: orbax's save errors are logged again after the last."""
    global _save_error_holders
    with _save_error_lock:
        _save_error_holders = max(_save_error_holders - 1, 0)
        if _save_error_holders == 0:
            logging.getLogger("absl").removeFilter(_SAVE_ERRORS)


def root_cause(error: BaseException, limit: int = 300) -> str:
    """The root cause of an error (orbax wraps tensorstore's), on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: " + (text if len(text) <= limit else text[:limit] + " ...")
