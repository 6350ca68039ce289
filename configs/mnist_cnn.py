"""The small CNN on MNIST from TFDS (prepare it first: see README, "Data and batch
composition"; needs `pip install -e ".[data]"`).

    TFDS_DATA_DIR=~/tensorflow_datasets python scripts/train.py \\
        --config=configs/mnist_cnn.py --workdir=workdir/mnist_cnn
"""

from bnjax.train.defaults import base_config


def get_config():
    config = base_config()
    config.dataset = "mnist"
    config.num_steps = 2000
    config.eval_every = 500
    config.checkpoint_every = 500
    return config
