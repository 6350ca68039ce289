"""Progress of a long loop: a rich progress bar on an interactive terminal, lines otherwise.

`Progress` draws a bar (on stderr, removed when it closes) only when it is enabled and stderr
is a terminal; anywhere else (logs, CI, notebooks' captured output) each update goes to `log`
as one line, or nowhere when `log` is None. `track` wraps an iterable in one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """Progress over `total` items, starting at `completed`.

    Args:
      description: what is counted ("training", "study"); the bar's label.
      total: the number of items (None: unknown).
      completed: items already done (a resumed run).
      enabled: False never draws a bar (updates still go to `log`).
      log: where an update's line goes when no bar is drawn (None: nowhere).

    Example (not on a terminal: one line per update):
      >>> with Progress("study", total=2, log=print) as progress:
      ...     progress.advance("uniform/batch done")
      ...     progress.advance("skewed/batch done")
      uniform/batch done
      skewed/batch done
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        completed: int = 0,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.description, self.log, self._bar = description, log, None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(transient=True, console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=total, completed=completed)
            self._bar.start()

    def update(self, completed: int, message: str = "") -> None:
        """`completed` items are done; `message` (the bar's label, or the logged line) says how
        it goes, e.g. the current loss."""
        if self._bar is not None:
            label = message or self.description
            self._bar.update(self._task, completed=completed, description=label)
        elif self.log is not None and message:
            self.log(message)

    def advance(self, message: str = "") -> None:
        """One more item is done; `message` says which."""
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=message or self.description)
        elif self.log is not None and message:
            self.log(message)

    def close(self) -> None:
        """Removes the bar (a no-op without one)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def track(
    items: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    enabled: bool = True,
    log: Callable[[str], None] | None = None,
) -> Iterator[T]:
    """The `items`, counted by a `Progress` as they are consumed (a bar labelled `description`,
    or lines "description i/total").

    Example:
      >>> [x * 2 for x in track([1, 2], "batches", total=2, log=print)]
      batches 1/2
      batches 2/2
      [2, 4]
    """
    with Progress(description, total, enabled=enabled, log=log) as progress:
        for index, item in enumerate(items, 1):
            yield item
            # The bar keeps its label and counts itself; a line needs the count spelled out.
            line = f"{description} {index}/{total or '?'}" if progress.log else ""
            progress.update(index, line)
