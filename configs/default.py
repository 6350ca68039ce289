"""The default run: a small CNN with batch norm on the generated heterogeneous-cluster images,
uniformly shuffled batches. About 30 s on a 2-core CPU (22 s of training); held-out accuracy
1.000.

    python scripts/train.py --config=configs/default.py --workdir=workdir/default

Override any key from the command line, e.g. the batch composition of the study:

    python scripts/train.py --config=configs/default.py --workdir=workdir/skewed \\
        --config.sampler=skewed --config.skew=0.9

Every key, with its meaning, is in bnjax/train/defaults.py.
"""

from bnjax.train.defaults import base_config


def get_config():
    return base_config()
