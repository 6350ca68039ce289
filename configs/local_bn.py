"""Local (unsynchronised) batch norm under jit: statistics per group of `ghost_batch_size`
examples, e.g. the per-device batch of a data-parallel run (no statistics traffic).

    python scripts/train.py --config=configs/local_bn.py --workdir=workdir/local_bn
"""

from bnjax.train.defaults import base_config


def get_config():
    config = base_config()
    config.ghost_batch_size = 16  # = 128 examples / 8 devices
    return config
