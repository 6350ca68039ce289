"""Stopping a training run on SIGINT, SIGTERM or SIGHUP at a step boundary, its state saved.

`StopOnSignal` is a context manager the loop holds while it trains. The first of those signals
is only recorded (`received`); the loop looks at it between steps, lets the in-flight
checkpoint finish, saves the step it stopped at, and raises `TrainingInterrupted`. A second
signal acts at once with the signal's default action (the process ends, as a kill would: the
next run still resumes from the newest committed checkpoint, bit-identically).

The exit status a shell reports for a process ended by signal n is 128 + n: 130 for SIGINT
(Ctrl-C), 143 for SIGTERM, 129 for SIGHUP. `TrainingInterrupted.exit_code` is that number, so
a command line that exits with it tells a scheduler the same thing a default death would.

Handlers are installed only in the main thread of a one-process run (Python cannot install them
elsewhere; the processes of a multi-process run would stop at different steps). Otherwise the
signals keep their previous behaviour.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["STOP_SIGNALS", "StopOnSignal", "TrainingInterrupted"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal ended the run after `step` (saved); re-running the command resumes.

    A KeyboardInterrupt, so that code catching ``Exception`` lets it through, as it does Ctrl-C.
    """

    def __init__(self, step: int, signal_number: int):
        super().__init__(f"interrupted at step {step}; resume with the same command")
        self.step = step
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended."""
        return 128 + self.signal_number

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name


class StopOnSignal:
    """Records the first SIGINT/SIGTERM/SIGHUP instead of acting on it (a context manager).

    `received` is None until a signal arrives, then its number. On exit the previous handlers
    are restored.

    Usage (as the loop does):

        with StopOnSignal() as stop:
            for step in steps:
                if stop.received is not None:
                    ...  # save, then raise TrainingInterrupted(step - 1, stop.received)
                train(step)
    """

    def __init__(self, active: bool = True):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame) -> None:
        """The handler: records the first signal, ends the process on the second."""
        if self.received is None:
            self.received = number
            return
        # A second signal: the user insists. Die by it now, as without a handler.
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)

    def __enter__(self) -> StopOnSignal:
        if self.active:
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
