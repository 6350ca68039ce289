"""The batch-composition study: ``python scripts/batch_study.py --config=configs/batch_study.py
--workdir=DIR``. The grid, metrics, tables and plots live in `bnjax.study`; this file only parses
flags.

Writes DIR/results.csv (one row per run), DIR/table.md (mean and 95% bootstrap interval over
seeds), DIR/verdicts.md (each claim tested) and DIR/plots/*.png; started again on the same DIR it
resumes. `--config=configs/batch_study.py:quick` runs a small grid in about 70 seconds.

A mistake ends in one ``error: ...`` line on stderr, never a traceback:

- exit 0: the study finished (or was already finished), every output written;
- exit 1: the study failed while running (an OSError such as a full disk); results.csv holds
  every cell finished before it, and the same command resumes;
- exit 2: it could not start: an unknown or invalid ``--config.KEY``, a config file that does
  not load, an extra argument, a workdir that is a file, a workdir holding another config's
  study, results without their saved config, or a results.csv that does not read back;
- exit 130: interrupted (Ctrl-C); the same command resumes.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bnjax.study import runner
from bnjax.study.defaults import study_config
from bnjax.train.cli import RUN_FAILED, USAGE_ERROR, fail

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (configs/)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.csv, table.md and plots/ go")
flags.mark_flags_as_required(["config", "workdir"])
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
INTERRUPTED = 130


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (exit 2) instead of tracebacks and usage text."""
    try:
        return flags.FLAGS(argv)
    except SystemExit as exit_:
        # absl exits 1 after printing --help; asking for help is not a failed run.
        if exit_.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except AttributeError as error:  # ml_collections: an override of a key the config lacks
        key = str(error).strip("\"'")
        fail(
            f"--config.{key} is not a config key of the study; the keys are "
            f"{', '.join(study_config())} (their meanings: bnjax/study/defaults.py)."
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


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]} (every option is a --flag; see --help).")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    # Many runs share a network shape but build fresh jitted functions (recalibration, the
    # population pass): the persistent cache turns their repeated compiles into disk reads.
    # Only a directory can hold the cache; a bad workdir is reported by the runner.
    if os.path.isdir(_WORKDIR.value) or not os.path.exists(_WORKDIR.value):
        jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        config = _CONFIG.value
        config.keys()  # a config file that did not load raises on first use, not at parsing
    except (OSError, ValueError) as error:
        fail(f"the config file did not load: {error}")
    try:
        runner.run_study(config, _WORKDIR.value)
    except runner.StudyStartError as error:
        fail(str(error), USAGE_ERROR)
    except (OSError, ValueError) as error:
        fail(f"the study stopped: {error}; results.csv keeps every finished cell.", RUN_FAILED)
    except KeyboardInterrupt:
        print("interrupted; resume with the same command.", file=sys.stderr)
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
