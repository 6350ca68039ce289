"""The batch-composition study: the paper's Table 1 as numbers, and which normalizer repairs what.

    python scripts/batch_study.py --config=configs/batch_study.py --workdir=workdir/batch_study

About 9 minutes on a 2-core CPU; writes results.csv, table.md and plots/ to the workdir. The
larger grid (more seeds and steps, a wider net) for an accelerator:

    python scripts/batch_study.py --config=configs/batch_study.py --config.scale=full \\
        --workdir=workdir/batch_study_full

`scale=full` replaces the keys listed under `full` (change one with e.g.
`--config.full.num_seeds=10`); every other key applies at both scales. Identical
hyperparameters for every condition and normalizer: only the batches differ. Every key, with
its meaning, is in bnjax/study/defaults.py.
"""

from bnjax.study.defaults import study_config


def get_config():
    return study_config()
