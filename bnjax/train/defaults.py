"""The base training config: every key `bnjax.train.loop` reads, with the default run's values.

Experiment files in configs/ start from `base_config()` and override what differs, so a key's
meaning and default live in one place: `DESCRIPTIONS` says what each key means (the training
script's ``--help`` lists them with their defaults), and `bnjax.train.config.check_config`
validates them.
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
    config.conv = "plain"  # plain | standardized | centered (small_cnn, resnets)
    config.bn_momentum = 0.9
    # Batch renorm's warm-up (bnjax.RenormSchedule): plain BN for renorm_warmup_steps, then
    # r_max 1 -> 3 and d_max 0 -> 5 over their relax steps. None: in proportion to num_steps.
    config.renorm_warmup_steps = ml_collections.FieldReference(None, field_type=int)
    config.renorm_r_relax_steps = ml_collections.FieldReference(None, field_type=int)
    config.renorm_d_relax_steps = ml_collections.FieldReference(None, field_type=int)
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
    # Averaged model (bnjax.train.averaged_model): an EMA of the weights, evaluated and
    # checkpointed beside the trained model; its batch statistics averaged or recalibrated.
    config.ema_decay = 0.0  # 0: off; e.g. 0.99
    config.ema_statistics = "average"  # average | recalibrate
    config.ema_recalibration_batches = 8
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


# What each key means, for ``scripts/train.py --help`` and the README (a test keeps this and
# `base_config` in step).
DESCRIPTIONS = {
    "seed": "seed of the initialisation, the data order and the generated data",
    "dataset": "clusters | digits (no download) | mnist | fashion_mnist | cifar10 (TFDS)",
    "data_dir": "TFDS data directory with the prepared dataset (None: $TFDS_DATA_DIR)",
    "sampler": "batch composition: uniform | clustered | skewed | balanced",
    "sampler_groups": "what the sampler groups by: class | subcluster (clusters only)",
    "skew": "skewed sampler: share of each batch from its dominant group(s), in [0, 1]",
    "num_dominant": "skewed sampler: number of dominant groups per batch",
    "shuffle_batches": "clustered sampler: one-group batches in random order",
    "model": "mlp | small_cnn | resnet20 | resnet18",
    "model_features": "mlp / small_cnn layer widths, e.g. (32, 64)",
    "norm": "batch | batch_renorm | group | layer | instance | none",
    "norm_groups": "group norm: number of channel groups (divides every layer's width)",
    "conv": "plain | standardized (weight standardization) | centered (conv models only)",
    "bn_momentum": "decay of BN running statistics (flax convention; PyTorch 0.1 = 0.9)",
    "renorm_warmup_steps": "batch_renorm: steps of plain BN first (None: num_steps // 10)",
    "renorm_r_relax_steps": "batch_renorm: steps r_max takes from 1 to 3 (None: num_steps // 2)",
    "renorm_d_relax_steps": "batch_renorm: steps d_max takes from 0 to 5 (None: 3*num_steps // 10)",
    "ghost_batch_size": "BN statistics per group of this many examples (None: whole batch)",
    "zero_init_residual": "resnets: start each block's last norm scale at 0",
    "mixed_precision": "bf16 compute; parameters and BN statistics stay float32",
    "batch_size": "global training batch (split over the devices)",
    "eval_batch_size": "held-out batch size (batch-statistics evaluation: at least 2)",
    "num_steps": "training steps",
    "optimizer": "sgd | nesterov | adamw",
    "learning_rate": "peak learning rate",
    "momentum": "sgd / nesterov momentum",
    "weight_decay": "weight decay on kernels (not on norm scales and biases)",
    "schedule": "learning-rate schedule after warm-up: constant | cosine",
    "warmup_steps": "linear learning-rate warm-up steps",
    "ema_decay": "decay of an EMA of the weights, evaluated and saved too, in [0, 1) (0: off)",
    "ema_statistics": "the EMA model's BN statistics: average (with the weights) | recalibrate",
    "ema_recalibration_batches": "ema_statistics=recalibrate: first training batches it uses",
    "parallel": "jit (sharded batch) | shard_map | pmap",
    "num_devices": "devices to use (None: all)",
    "log_every": "steps between training-metric records",
    "eval_every": "steps between held-out evaluations",
    "checkpoint_every": "steps between checkpoints (the last step is always saved)",
    "keep_checkpoints": "newest checkpoints kept",
    "progress": "a progress bar when stderr is a terminal",
    "telemetry": "per-layer BN drift in the metrics (jit mode)",
}
