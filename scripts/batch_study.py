"""The batch-composition study: ``python scripts/batch_study.py --config=configs/batch_study.py
--workdir=DIR``. The grid, metrics, tables and plots live in `bnjax.study`; this file only parses
flags.

Writes DIR/results.csv (one row per run), DIR/table.md (mean and 95% bootstrap interval over
seeds), DIR/verdicts.md (each claim tested) and DIR/plots/*.png; started again on the same DIR it
resumes. `--config=configs/batch_study.py:quick` runs a small grid in about 70 seconds.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bnjax.study import runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (configs/)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.csv, table.md and plots/ go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    # Many runs share a network shape but build fresh jitted functions (recalibration, the
    # population pass): the persistent cache turns their repeated compiles into disk reads.
    jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        runner.run_study(_CONFIG.value, _WORKDIR.value)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
