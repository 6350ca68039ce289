"""The batch-composition study: metrics that turn the paper's Table 1 into numbers.

`metrics` holds those measured on a run (batch-statistic variability, loss-curve shape,
gradient noise, running-statistics bias), `evaluation` those measured on held-out data
(accuracy, representation coherence) and a mean ± std summary; both are re-exported here.
The study itself: `grid` (what runs), `experiment` (train and measure), `significance`
(bootstrap intervals, Welch tests, Holm), `claims` (the paper's claims as tests), `report`,
`plots` and `runner` (`scripts/batch_study.py`).

References:
  Branson, Batch Normalization Behavior Under Inconsistent Mini-Batch Distributions (the
  paper whose Table 1 the study turns into numbers).
  Wu & Johnson (2021), Rethinking "Batch" in BatchNorm, arXiv:2105.07576.

bnjax.study is an application on top of the library and of bnjax.train: it needs
``pip install 'bnjax[study]'``.
"""

from bnjax import extras

extras.require("study", "bnjax.study")

# The extras check comes first so that a missing package is reported with its install command.
from bnjax.study.evaluation import (  # noqa: E402
    Summary,
    accuracy,
    accuracy_gap,
    format_mean_std,
    format_summary,
    intra_inter_ratio,
    mean_std,
    silhouette,
    summarize,
)
from bnjax.study.metrics import (  # noqa: E402
    batch_stat_variability,
    final_loss,
    loss_oscillation,
    population_stats,
    running_stat_bias,
    smooth,
    steps_to_target,
    trajectory_variance,
    update_noise,
    update_pair,
)

__all__ = [
    "Summary",
    "accuracy",
    "accuracy_gap",
    "batch_stat_variability",
    "final_loss",
    "format_mean_std",
    "format_summary",
    "intra_inter_ratio",
    "loss_oscillation",
    "mean_std",
    "population_stats",
    "running_stat_bias",
    "silhouette",
    "smooth",
    "steps_to_target",
    "summarize",
    "trajectory_variance",
    "update_noise",
    "update_pair",
]
