"""The base training config: every key `bnjax.train.loop` reads, with the default run's values.

Experiment files in configs/ start from `base_config()` and override what differs, so a key's
meaning and default live in one place. `bnjax.train.config.check_config` validates them.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every key the loop reads, at the default run's values (configs/ override them)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Data and batch composition (bnjax.data).
    config.dataset = "clusters"  # clusters | digits | mnist | fashion_mnist | cifar10
    config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir
    config.sampler = "uniform"  # uniform | clustered | skewed | balanced
    config.sampler_groups = "class"  # class | subcluster
    config.skew = 0.5  # skewed: share of each batch from its dominant group(s)
    config.num_dominant = 1
    config.shuffle_batches = False  # clustered: one-group batches in random order
    # Model (bnjax.models).
    config.model = "small_cnn"  # mlp | small_cnn | resnet20 | resnet18
    config.model_features = (32, 64)  # mlp / small_cnn widths
    config.norm = "batch"  # batch | batch_renorm | group | layer | instance | none
    config.norm_groups = 8
    config.bn_momentum = 0.9
    # Per-group ("ghost") batch statistics; = per-device batch for local (unsynced) BN.
    config.ghost_batch_size = ml_collections.FieldReference(None, field_type=int)
    config.zero_init_residual = False
    config.mixed_precision = False  # bf16 compute; params and BN statistics stay float32
    # Optimization (optax).
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_steps = 600
    config.optimizer = "nesterov"  # sgd | nesterov | adamw
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "cosine"  # constant | cosine
    config.warmup_steps = 50
    # Devices (bnjax.parallel).
    config.parallel = "jit"  # jit | shard_map | pmap
    config.num_devices = ml_collections.FieldReference(None, field_type=int)  # None: all
    # Logging and checkpoints.
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 200
    config.keep_checkpoints = 3
    config.progress = True  # a progress bar when stderr is a terminal
    config.telemetry = True  # per-layer BN drift in the metrics (jit mode)
    return config
