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
  not load, an extra argument, a workdir that is a file, a busy workdir (another study or a
  training run holds its ``.lock``: the same `bnjax.train.workdir.WorkdirLock` as
  ``scripts/train.py``), a workdir holding a training run, a workdir holding another config's
  study (the line names each changed key, old -> new), a damaged ``study_config.json``,
  results without their saved config, or a results.csv that does not read back;
- exit 130: interrupted (Ctrl-C); the same command resumes.
"""

import functools
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bnjax.study import runner
from bnjax.study.defaults import study_config
from bnjax.train.cli import INTERRUPTED, RUN_FAILED, USAGE_ERROR, fail, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (configs/)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.csv, table.md and plots/ go")
flags.mark_flags_as_required(["config", "workdir"])


def _unknown_key(key: str) -> str:
    return (
        f"--config.{key} is not a config key of the study; the keys are "
        f"{', '.join(study_config())} (their meanings: bnjax/study/defaults.py)."
    )


def main(argv) -> None:
    del argv  # cli.parse_flags refused any argument that is not a flag
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
    app.run(main, flags_parser=functools.partial(parse_flags, unknown_key=_unknown_key))
