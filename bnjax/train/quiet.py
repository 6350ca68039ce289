"""Restore attempts that fail quietly: one warning from the caller, not orbax's log spam.

When one read of an orbax restore fails, orbax closes its event loop and abandons the other
reads, which then report their own failures later and from elsewhere: in tensorstore's threads
("Event loop is closed"), as collected coroutines, and as futures whose "exception was never
retrieved" asyncio logs with a traceback. `quietly` holds back the log records of an attempt
and, when it fails, silences those leftovers (only those: errors from orbax or tensorstore
code) for the rest of the process, so that a corrupt checkpoint is reported once, by
`bnjax.train.checkpoints.Checkpointer`, in one line.

Saves fail the same way: a write that fails in orbax's background threads (a full disk) is
logged there with its traceback, several times, then raised to the thread that waits for the
save. `hold_back_save_errors` drops those logs; the Checkpointer raises the error once.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
import warnings

_NOISY_LOGGERS = ("absl", "asyncio")  # orbax logs through absl; failed tasks through asyncio
_LIBS = ("orbax", "tensorstore")  # whose leftovers a failed restore silences


def _drop_tracebacks(error: BaseException | None) -> None:
    """Frees the frames an error (and its causes) holds, with the tasks they reference."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's reports of the orbax reads that a failed restore abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "never retrieved" not in text and "destroyed but it is pending" not in text:
            return True
        trace = record.exc_info[2] if record.exc_info else None
        files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(trace)]
        return not any(library in place for library in _LIBS for place in (text, *files))


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
    if getattr(hook, "_bnjax_hushed", False):
        return hook

    def hushed(unraisable) -> None:
        if not _leftover(unraisable):
            hook(unraisable)

    hushed._bnjax_hushed = True
    return hushed


_LEFTOVERS = _OrbaxLeftovers()

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


def hold_back_save_errors() -> None:
    """From now on, drop orbax's logged tracebacks of failed saves (for the process).

    Only the error records orbax writes from its futures, async checkpointer and checkpoint
    manager, which are the failures that `wait_until_finished` (or the next save) raises.
    """
    logging.getLogger("absl").addFilter(_SAVE_ERRORS)  # addFilter skips duplicates


def quietly(function, *args, keep=lambda record: True):
    """``function(*args)`` with absl and asyncio log records held back.

    On success the records that `keep` accepts are replayed. On failure they are dropped, and
    so is what the orbax reads abandoned by the failure report later: when one read of a
    restore fails, orbax closes its event loop and abandons the others, which then fail in
    tensorstore's threads ("Event loop is closed"), as coroutines that are collected, and as
    futures whose "exception was never retrieved" asyncio logs with a traceback, long after
    the failure was handled. After a failure those reports (only those) are silenced for the
    rest of the process. The error itself (its message and causes, without orbax's frames)
    is raised to the caller.
    """
    held = []

    class Hold(logging.Filter):
        def filter(self, record):
            held.append(record)
            return False

    hold, loggers = Hold(), [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(hold)
    previous = sys.unraisablehook
    sys.unraisablehook = during = _hushed(previous)
    failure = result = None
    try:
        try:
            result = function(*args)
        except BaseException as error:
            failure = error
        if failure is not None:
            logging.getLogger("asyncio").addFilter(_LEFTOVERS)  # addFilter skips duplicates
            _drop_tracebacks(failure)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # coroutines never awaited
                sys.unraisablehook = lambda unraisable: None
                try:
                    gc.collect()
                finally:
                    sys.unraisablehook = during  # and it stays
            held.clear()
    finally:
        if failure is None and sys.unraisablehook is during:
            sys.unraisablehook = previous
        for logger in loggers:
            logger.removeFilter(hold)
        for record in held:
            if keep(record):
                logging.getLogger(record.name).handle(record)
    if failure is not None:
        raise failure
    return result


def root_cause(error: BaseException, limit: int = 300) -> str:
    """The root cause of an error (orbax wraps tensorstore's), on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: " + (text if len(text) <= limit else text[:limit] + " ...")
