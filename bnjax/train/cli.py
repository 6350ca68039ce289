"""The command line of ``scripts/train.py``: flag parsing, ``--help`` and exit codes.

A mistake on the command line ends in one line on stderr that names it, never a traceback:

- exit 0: trained (or already finished), the final checkpoint on disk and verified;
- exit 1: the run failed: the loss became non-finite, a state could not be checkpointed
  (non-finite, or the disk is full), the final state could not be saved, or another
  operating-system error (the line names it);
- exit 2: the run could not start: an unknown or invalid ``--config.KEY``, an unexpected
  argument, a config file that does not load, a TFDS dataset that is not prepared, a busy,
  unusable (empty, a file, a directory where a file belongs) or read-only workdir with steps
  left to train, a damaged ``config.json``, or a resume whose config changes what is trained;
- exit 130, 143, 129: stopped by SIGINT, SIGTERM, SIGHUP (one line: ``interrupted at step N;
  resume with the same command``; see `bnjax.train.interrupts`).

``--help`` lists every config key with its default and meaning (`bnjax.train.defaults`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

from bnjax.data.tfds_source import DatasetNotPreparedError
from bnjax.train.defaults import DESCRIPTIONS, base_config
from bnjax.train.workdir import WorkdirBusyError

USAGE_ERROR = 2
RUN_FAILED = 1
INTERRUPTED = 128 + 2  # as a shell reports a process ended by SIGINT
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def config_help() -> str:
    """The config keys, their defaults and meanings, one per line (for ``--help``).

    Example:
      >>> print(config_help().splitlines()[1])
        --config.seed=0  seed of the initialisation, the data order and the generated data
    """
    config = base_config()
    lines = ["Experiment config file (configs/*.py). Override any key with --config.KEY=VALUE:"]
    for key, meaning in DESCRIPTIONS.items():
        lines.append(f"  --config.{key}={config[key]!r}  {meaning}")
    return "\n".join(lines)


def fail(message: str, code: int = USAGE_ERROR):
    """Prints ``error: message`` (one line) on stderr and exits with `code`."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def parse_flags(
    argv: list[str],
    *,
    allow_arguments: bool = False,
    unknown_key: Callable[[str], str] | None = None,
) -> list[str]:
    """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`) with one-line errors.

    An argument that is not a flag is refused unless `allow_arguments` (a command with
    subcommands, such as ``python -m bnjax.export verify ARTIFACT``, checks its own).
    `unknown_key(key)` words the error for an override of a key the config lacks (default:
    the training config's keys); `functools.partial` sets these for another command.
    """
    try:
        remaining = flags.FLAGS(argv)
    except SystemExit as exit_:
        # absl exits 1 after printing --help; asking for help is not a failed run.
        if exit_.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except AttributeError as error:  # ml_collections: an override of a key the config lacks
        key = str(error).strip("\"'")
        fail(
            unknown_key(key)
            if unknown_key is not None
            else f"--config.{key} is not a config key; the keys are {', '.join(DESCRIPTIONS)} "
            f"(see {argv[0]} --help)."
        )
    except flags.Error as error:
        message = str(error)
        if "Traceback (most recent call last)" in message:
            # ml_collections puts the config file's whole traceback in the message: its last
            # line is the error the file raised.
            fail(f"the config file did not load: {message.strip().splitlines()[-1]}")
        fail(f"{message} (see {argv[0]} --help).")
    except (OSError, ValueError) as error:  # the --config file (or its variant) did not load
        fail(f"the config file did not load: {error}")
    except Exception as error:  # its get_config raised anything else (a ZeroDivisionError...)
        fail(f"the config file did not load: {type(error).__name__}: {error}")
    if len(remaining) > 1 and not allow_arguments:
        fail(
            f"unexpected argument(s) {' '.join(remaining[1:])!r}: every setting is a flag "
            f"(--config.KEY=VALUE, --workdir=DIR; see {argv[0]} --help)."
        )
    return remaining


def run(train: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Calls `train()`, turning the failures a user can act on into one line and an exit code.

    Example:
      >>> run(lambda: {"loss": 0.5})
      {'loss': 0.5}
    """
    from bnjax.checkpoints import CheckpointWriteError, UnsafeStateError
    from bnjax.train.interrupts import TrainingInterrupted
    from bnjax.train.loop import FinalCheckpointError, NonFiniteLossError

    try:
        return train()
    except TrainingInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        sys.exit(interrupted.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the run took over the signal (start-up)
        print("interrupted before training started; nothing was changed", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except DatasetNotPreparedError as error:
        fail(error.summary())
    # Before ValueError: a state refused at its checkpoint was trained (and diverged).
    except (NonFiniteLossError, FinalCheckpointError, UnsafeStateError) as error:
        fail(str(error), RUN_FAILED)
    except (ValueError, WorkdirBusyError) as error:
        fail(str(error))
    except CheckpointWriteError as error:
        fail(str(error), RUN_FAILED)
    except OSError as error:  # a disk that fills, a file that cannot be read: name it
        # An operating system's error says little without its type; bnjax's own say enough.
        fail(str(error) if error.errno is None else f"{type(error).__name__}: {error}", RUN_FAILED)
