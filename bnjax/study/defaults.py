"""The batch-composition study's config: every key `bnjax.study.runner` reads, with the default
run's values. configs/batch_study.py starts from `study_config()`; `runner.check_study_config`
validates the keys. Identical hyperparameters for every condition and normalizer: only the
batches differ.
"""

import ml_collections


def study_config() -> ml_collections.ConfigDict:
    """Every key the study reads, at the default (small-scale) values.

    Example:
      >>> config = study_config()
      >>> config.num_steps, config.run_conditions[:2], config.full.num_steps
      (300, ('uniform', 'clustered'), 2000)
    """
    config = ml_collections.ConfigDict()
    config.scale = "small"  # small | full
    config.dataset = "clusters"  # the generated heterogeneous clusters (bnjax.data)
    config.data_seed = 0  # the data set is fixed; the run seeds vary init and batch order
    config.num_seeds = 3
    # The network: bnjax.models.SmallCNN, a norm after each conv (layers at three depths).
    config.model_features = (16, 32, 64)
    config.norm_groups = 8  # group norm: channel groups (divides every width)
    config.bn_momentum = 0.9  # decay of the running averages
    config.ghost_batch_size = 8  # 'ghost_batch': statistics over groups of this many examples
    # Batch renorm: decay of its renorm statistics (the ones r and d correct toward), and its
    # warm-up as fractions of num_steps (the paper's 5k / 35k / 20k shape). 0.99 remembers its
    # initial mean 0 / var 1 for hundreds of steps: too long for the sweep's 75-step runs.
    config.renorm_momentum = 0.9
    config.renorm_warmup = 0.1
    config.renorm_r_relax = 0.5
    config.renorm_d_relax = 0.3
    # Optimization: the same for every run.
    config.num_steps = 300
    config.optimizer = "nesterov"
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "cosine"
    config.warmup_steps = 30
    # The paper's five conditions: the sampler that draws the training batches, and B.
    config.conditions = ml_collections.ConfigDict(
        {
            "uniform": {"sampler": "uniform", "batch_size": 32},
            # Each batch holds one sub-cluster (similar samples), batches in random order.
            "clustered": {
                "sampler": "clustered",
                "batch_size": 32,
                "groups": "subcluster",
                "shuffle_batches": True,
            },
            # 80% of each batch from one class, the rest uniform.
            "skewed": {"sampler": "skewed", "batch_size": 32, "skew": 0.8},
            "small_batch": {"sampler": "uniform", "batch_size": 4},
            # Large batches whose composition varies: half of each from one class.
            "large_inconsistent": {"sampler": "skewed", "batch_size": 128, "skew": 0.5},
        }
    )
    config.run_conditions = ("uniform", "clustered", "skewed", "small_batch", "large_inconsistent")
    config.normalizers = (
        "batch",
        "batch_renorm",
        "group",
        "layer",
        "ghost_batch",
        "batch+recalibration",
    )
    # The batch-size sweep (uniform batches), the analogue of the Group Norm paper's figure.
    config.sweep_batch_sizes = (2, 4, 8, 16, 32, 64, 128)
    config.sweep_normalizers = ("batch", "group", "batch_renorm")
    # Every sweep run sees the same examples (the main grid's 300 x 32, about one epoch):
    # batch B trains sweep_examples // B steps at learning_rate * B / 32 (linear scaling).
    config.sweep_examples = 9600
    config.sweep_reference_batch_size = 32
    # Measurement.
    config.stability_window = 0.5  # batch-statistic variability over the last half of steps
    config.loss_target = 0.5  # steps_to_target: first step with 10-step mean loss <= this
    config.eval_batch_size = 500  # held-out batches (also for population statistics)
    config.recalibration_batch_size = 128  # 'batch+recalibration': one uniform epoch of these
    config.plots = True
    config.progress = True  # a progress bar on an interactive terminal
    # scale=full: these keys replace the ones above.
    config.full = ml_collections.ConfigDict(
        {
            "num_seeds": 5,
            "num_steps": 2000,
            "warmup_steps": 100,
            "model_features": (32, 64, 128),
            "sweep_examples": 64_000,
        }
    )
    return config
