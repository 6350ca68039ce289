"""The batch-composition study: the paper's Table 1 as numbers, deconfounded, with verdicts.

    python scripts/batch_study.py --config=configs/batch_study.py --workdir=workdir/batch_study
    python scripts/batch_study.py --config=configs/batch_study.py:quick --workdir=/tmp/quick

The default grid (two datasets, 5 seeds, every family) took 22 minutes on a 2-core CPU;
`:quick` (one small dataset, 2 seeds, a few conditions) about 70 seconds, for trying it. Both
write results.csv, table.md, verdicts.md and plots/ to the workdir, and resume an interrupted
run on the same workdir. Every key, with its meaning, is in bnjax/study/defaults.py; change one
with e.g. `--config.num_seeds=10`.
"""

from bnjax.study.defaults import quick_config, study_config

VARIANTS = {"": study_config, "default": study_config, "quick": quick_config}


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"configs/batch_study.py:{variant}: choose one of {sorted(VARIANTS)}.")
    return VARIANTS[variant]()
