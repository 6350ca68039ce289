"""ResNet-20 with batch norm on scikit-learn's bundled 8x8 digits (no download), CPU-sized:
400 steps, about 41 s on a 2-core CPU (29 s of training); held-out accuracy 0.98.

python scripts/train.py --config=configs/digits_resnet.py --workdir=workdir/digits_resnet
"""

from bnjax.train.defaults import base_config


def get_config():
    config = base_config()
    config.dataset = "digits"
    config.model = "resnet20"
    config.batch_size = 64
    config.eval_batch_size = 359  # the whole test split in one batch
    config.num_steps = 400
    config.learning_rate = 0.05
    config.eval_every = 100
    config.checkpoint_every = 100
    return config
