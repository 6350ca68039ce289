"""CIFAR ResNet-18 on CIFAR-10 from TFDS, for a GPU or TPU (prepare the dataset first; see
README). Synchronised batch norm over all devices (jit with a sharded batch), bf16 compute.

    TFDS_DATA_DIR=~/tensorflow_datasets python scripts/train.py \\
        --config=configs/cifar10_resnet18.py --workdir=workdir/cifar10_resnet18
"""

from bnjax.train.defaults import base_config


def get_config():
    config = base_config()
    config.dataset = "cifar10"
    config.model = "resnet18"
    config.zero_init_residual = True
    config.mixed_precision = True
    config.batch_size = 512
    config.eval_batch_size = 1000
    config.num_steps = 20_000
    config.warmup_steps = 500
    config.learning_rate = 0.4
    config.weight_decay = 5e-4
    config.log_every = 100
    config.eval_every = 2000
    config.checkpoint_every = 1000
    return config
