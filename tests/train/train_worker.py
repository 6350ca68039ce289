"""scripts/train.py, stopped at an exact point of the run (run by test_kills_and_signals.py).

    python -m tests.train.train_worker PLAN -- [scripts/train.py flags]

PLAN is one of
  kill-after-commit:STEP        SIGKILL itself once the checkpoint of STEP is committed, before
                                that step's metrics are written (the evaluation runs after it)
  SIGNAL-during-save:STEP       send itself SIGNAL (SIGINT, SIGTERM, SIGHUP) right after the
                                save of STEP was started, while its files are written
  SIGNAL-at-step:STEP           send itself SIGNAL when STEP has trained (before its save)

The signals are real (``os.kill`` of its own pid); only the moment is chosen. Nothing of the
product is changed but the timing: `Checkpointer.save` and `Progress.update` are wrapped.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from bnjax.checkpoints import Checkpointer
from bnjax.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _after_save(step: int, action) -> None:
    save = Checkpointer.save

    def save_then_act(self, at, state, **options):
        written = save(self, at, state, **options)
        if written and int(at) == step:
            action(self)
        return written

    Checkpointer.save = save_then_act


def _at_step(step: int, action) -> None:
    update = Progress.update

    def update_then_act(self, completed, message=""):
        update(self, completed, message)
        if completed == step:
            action(None)

    Progress.update = update_then_act


def _kill_after_commit(checkpointer) -> None:
    checkpointer.wait_until_finished()  # committed: the step directory has its final name
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    plan, flags = argv[1], argv[argv.index("--") + 1 :]
    what, step = plan.rsplit(":", 1)
    if what == "kill-after-commit":
        _after_save(int(step), _kill_after_commit)
    else:
        name, when = what.split("-", 1)
        number = signal.Signals[name]
        send = lambda checkpointer: os.kill(os.getpid(), number)  # noqa: E731
        {"during-save": _after_save, "at-step": _at_step}[when](int(step), send)
    sys.argv = [os.path.join(ROOT, "scripts", "train.py"), *flags]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
