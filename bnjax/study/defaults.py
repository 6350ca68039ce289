"""The batch-composition study's config: every key `bnjax.study.runner` reads, with the default
run's values. configs/batch_study.py starts from `study_config()` (or `quick_config()` for
`--config=configs/batch_study.py:quick`); `runner.check_study_config` validates the keys.

What is held equal: every run of a dataset sees `example_budget` training examples (steps =
budget / B); each normalizer's learning rate is chosen once by a sweep on uniform batches of
`reference_batch_size` (best validation accuracy) and scaled linearly with B; everything else
(optimizer, schedule shape, network, initialization seeds) is identical across conditions.
"""

import ml_collections


def study_config() -> ml_collections.ConfigDict:
    """Every key the study reads, at the default values (22 minutes on 2 CPU cores).

    Example:
      >>> config = study_config()
      >>> config.num_seeds, config.datasets, config.run_conditions[:2]
      (5, ('clusters', 'digits'), ('uniform', 'clustered_stream'))
    """
    config = ml_collections.ConfigDict()
    # Data: the generated clusters, 8x8 and noisy enough to leave the accuracy ceiling (batch
    # norm on uniform batches: about 0.93; 16x16 images cost 4x the time for nothing the study
    # needs), and scikit-learn's digits.
    config.datasets = ("clusters", "digits")
    config.clusters = ml_collections.ConfigDict({"noise": 3.0, "image_size": 8})
    config.data_seed = 0  # the data set and the validation split are fixed
    config.validation_fraction = 0.2  # held out of training: rate choice and the probe
    config.probe_size = 256  # the fixed held-out probe for convergence curves
    config.probe_points = 16  # probe evaluations per run (the curve's resolution)
    config.num_seeds = 5  # every cell; seeds vary initialization and batch order
    # The network: bnjax.models.SmallCNN, a norm after each conv (layers at three depths).
    config.model_features = (16, 32, 64)
    config.norm_groups = 8  # group norm: channel groups (divides every width)
    config.bn_momentum = 0.9  # decay of the running averages (the table's)
    config.other_bn_momenta = (0.99,)  # the momentum family: batch norm at these too
    config.momentum_conditions = ("uniform", "clustered_stream", "skewed", "large_inconsistent")
    config.ghost_batch_size = 8  # 'ghost_batch': statistics over groups of this many examples
    # Batch renorm: decay of its renorm statistics and its warm-up as fractions of the run
    # (the paper's 5k / 35k / 20k shape).
    config.renorm_momentum = 0.9
    config.renorm_warmup = 0.1
    config.renorm_r_relax = 0.5
    config.renorm_d_relax = 0.3
    # Budget and optimization.
    config.example_budget = 9600  # training examples every run sees (steps = budget / B)
    config.reference_batch_size = 32  # the rate sweep's B; rates scale by B / this
    config.lr_candidates = (0.03, 0.1, 0.3)
    config.lr_seeds = 2  # seeds per rate in the sweep
    config.optimizer = "nesterov"
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "cosine"
    config.warmup_fraction = 0.1  # linear warm-up over this share of the steps
    # The paper's conditions, each at the same budget.
    config.conditions = ml_collections.ConfigDict(
        {
            "uniform": {"sampler": "uniform", "batch_size": 32},
            # One sub-cluster per batch, sub-cluster after sub-cluster (the paper's stream).
            "clustered_stream": {
                "sampler": "clustered",
                "batch_size": 32,
                "groups": "subcluster",
                "shuffle_batches": False,
            },
            # The same batches in random order.
            "clustered_shuffled": {
                "sampler": "clustered",
                "batch_size": 32,
                "groups": "subcluster",
                "shuffle_batches": True,
            },
            # 80% of each batch from one class, the rest uniform.
            "skewed": {"sampler": "skewed", "batch_size": 32, "skew": 0.8},
            "small_batch": {"sampler": "uniform", "batch_size": 4},
            # Large batches at the same skew as 'skewed': only B differs.
            "large_inconsistent": {"sampler": "skewed", "batch_size": 128, "skew": 0.8},
        }
    )
    config.run_conditions = (
        "uniform",
        "clustered_stream",
        "clustered_shuffled",
        "skewed",
        "small_batch",
        "large_inconsistent",
    )
    config.normalizers = (
        "none",
        "batch",
        "batch_renorm",
        "group",
        "layer",
        "ghost_batch",
        "batch+recalibration",
    )
    # The dose-response: skew levels x batch sizes x normalizers (skew 0: uniform batches).
    config.dose_skews = (0.0, 0.5, 0.8, 0.95)
    config.dose_batch_sizes = (8, 32, 128)
    config.dose_normalizers = ("batch", "group", "none")
    # Training lengths: these fractions of the budget (the table is 1.0).
    config.length_fractions = (0.25, 0.5)
    config.length_conditions = ("uniform", "clustered_stream", "skewed")
    config.length_normalizers = ("batch", "none")
    # Measurement.
    config.probe_target = 0.8  # examples_to_target: first probe accuracy >= this
    config.stability_batches = 32  # batches of each kind for the statistics' stability
    config.eval_batch_size = 500  # held-out batches (batch statistics at this B, and at B)
    config.population_batch_size = 500  # batches of the population statistics
    config.population_examples = 4000  # the first this many training examples (all if fewer)
    config.recalibration_batch_size = 128  # 'batch+recalibration': one uniform epoch of these
    config.bootstrap_resamples = 10_000
    config.plots = True
    config.progress = True  # a progress bar on an interactive terminal
    return config


def quick_config() -> ml_collections.ConfigDict:
    """A small grid to try the study (about 70 seconds on 2 CPU cores): one dataset, two
    seeds, three conditions, four normalizers, a short budget, no momentum or length family.

    Example:
      >>> quick_config().num_seeds, quick_config().example_budget
      (2, 2560)
    """
    config = study_config()
    config.datasets = ("clusters",)
    config.clusters = ml_collections.ConfigDict(
        {"noise": 2.0, "image_size": 8, "train_per_class": 400, "test_per_class": 100}
    )
    config.num_seeds = 2
    config.lr_candidates = (0.1, 0.3)
    config.lr_seeds = 1
    config.example_budget = 2560
    config.model_features = (8, 16, 32)
    config.run_conditions = ("uniform", "clustered_stream", "skewed")
    config.normalizers = ("none", "batch", "group", "batch+recalibration")
    config.dose_skews = (0.0, 0.8)
    config.dose_batch_sizes = (8, 32)
    config.dose_normalizers = ("batch", "none")
    config.other_bn_momenta = ()
    config.momentum_conditions = ()
    config.length_fractions = ()
    config.probe_points = 12
    config.probe_size = 256
    config.stability_batches = 16
    config.bootstrap_resamples = 2000
    return config
