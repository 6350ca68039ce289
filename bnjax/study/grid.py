"""What the batch-composition study runs: conditions, normalizers and the grid of runs.

A run is one (condition, normalizer, seed) triple, trained with the study's shared
hyperparameters. The paper's five training conditions are batch compositions:

    name                   paper's row                                       sampler
    uniform                Uniformly shuffled mini-batches                  uniform, B
    clustered              Clustered similar samples in batches             clustered by sub-cluster
    skewed                 Synthetic class-skewed mini-batches              skewed by class
    small_batch            Small batch size with distribution consistency   uniform, small B
    large_inconsistent     Large batch size with distribution inconsistency skewed, large B

and the normalizers compared on each ('batch' is the paper's subject, the rest are fixes):

    batch                  batch norm
    batch_renorm           batch renormalization (Ioffe 2017), bounds warmed up over the run
    group, layer           statistics per example: independent of batch composition
    ghost_batch            batch norm over groups of `ghost_batch_size` examples
    batch+recalibration    the `batch` run, its running statistics then replaced by precise
                           population statistics (`bnjax.lifecycle.recalibrate`)

`batch+recalibration` trains nothing of its own: it shares the training run (and so every
training-time column) of `batch`, and differs in the evaluation-time columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from bnjax.data import GROUPINGS, SAMPLERS

# The paper's row labels, in its order.
PAPER_LABELS = {
    "uniform": "Uniformly shuffled mini-batches",
    "clustered": "Clustered similar samples in batches",
    "skewed": "Synthetic class-skewed mini-batches",
    "small_batch": "Small batch size with distribution consistency",
    "large_inconsistent": "Large batch size with distribution inconsistency",
}


@dataclasses.dataclass(frozen=True)
class Condition:
    """A batch composition: which sampler draws the training batches, and their size.

    Attributes:
      name: short id (a key of the config's `conditions`).
      sampler: 'uniform', 'clustered', 'skewed' or 'balanced' (`bnjax.data.make_sampler`).
      batch_size: B, examples per training step.
      groups: what the sampler groups by: 'class' or 'subcluster'.
      skew: 'skewed': share of each batch from its dominant group.
      shuffle_batches: 'clustered': batches in random order (True) or group after group.
      label: the row's label in the table (the paper's wording where it has one).

    Example:
      >>> Condition("skewed", "skewed", 64, skew=0.9).label  # the paper's wording
      'Synthetic class-skewed mini-batches'
      >>> Condition("tiny", "uniform", 1)
      Traceback (most recent call last):
      ValueError: conditions.tiny.batch_size=1: batch statistics need at least 2 examples per batch.
    """

    name: str
    sampler: str
    batch_size: int
    groups: str = "class"
    skew: float = 0.0
    shuffle_batches: bool = True
    label: str = ""

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"conditions.{self.name}.sampler={self.sampler!r}: choose one of {tuple(SAMPLERS)}."
            )
        if int(self.batch_size) < 2:
            raise ValueError(
                f"conditions.{self.name}.batch_size={self.batch_size}: batch statistics need "
                "at least 2 examples per batch."
            )
        if self.groups not in GROUPINGS:
            raise ValueError(
                f"conditions.{self.name}.groups={self.groups!r}: choose one of {tuple(GROUPINGS)}."
            )
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"conditions.{self.name}.skew={self.skew}: must be in [0, 1].")
        if not self.label:
            object.__setattr__(self, "label", PAPER_LABELS.get(self.name, self.name))


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """How the network normalizes: a `bnjax.models` norm plus options.

    Attributes:
      name: one of NORMALIZERS.
      norm: the model's `norm` ('batch', 'batch_renorm', 'group', 'layer').
      ghost_batch_size: batch norm statistics over groups of this many examples (None: whole
        batch); capped at the run's batch size.
      recalibrate: replace the running statistics by precise ones after training.
      trains_as: the normalizer whose training run this one shares (itself unless recalibrate).
      has_running_stats: whether `norm` keeps running statistics (batch, batch_renorm).

    Example:
      >>> n = Normalizer("batch+recalibration", "batch", recalibrate=True)
      >>> n.trains_as, n.has_running_stats, Normalizer("group", "group").has_running_stats
      ('batch', True, False)
    """

    name: str
    norm: str
    ghost_batch_size: int | None = None
    recalibrate: bool = False

    @property
    def trains_as(self) -> str:
        return "batch" if self.recalibrate else self.name

    @property
    def has_running_stats(self) -> bool:
        return self.norm in ("batch", "batch_renorm")


# The registry: name -> build(ghost_batch_size). Its keys are the valid normalizer names (the
# config's `normalizers` and `sweep_normalizers`), in the table's column order.
NORMALIZERS = {
    "batch": lambda ghost_batch_size: Normalizer("batch", "batch"),
    "batch_renorm": lambda ghost_batch_size: Normalizer("batch_renorm", "batch_renorm"),
    "group": lambda ghost_batch_size: Normalizer("group", "group"),
    "layer": lambda ghost_batch_size: Normalizer("layer", "layer"),
    "ghost_batch": lambda ghost_batch_size: Normalizer(
        "ghost_batch", "batch", ghost_batch_size=ghost_batch_size
    ),
    "batch+recalibration": lambda ghost_batch_size: Normalizer(
        "batch+recalibration", "batch", recalibrate=True
    ),
}


def normalizer(name: str, ghost_batch_size: int = 8) -> Normalizer:
    """The `Normalizer` called `name` (a key of NORMALIZERS).

    Example:
      >>> normalizer("ghost_batch", ghost_batch_size=4)
      Normalizer(name='ghost_batch', norm='batch', ghost_batch_size=4, recalibrate=False)
      >>> normalizer("batch+recalibration").trains_as
      'batch'
    """
    if name not in NORMALIZERS:
        raise ValueError(f"normalizer {name!r} is not one of {tuple(NORMALIZERS)}.")
    return NORMALIZERS[name](ghost_batch_size)


def conditions_from_config(conditions: Mapping, names: Iterable[str]) -> list[Condition]:
    """`Condition`s `names`, in that order, from the config's `conditions` mapping
    {name: {sampler, batch_size, ...}} (a mapping's own order is not kept by ConfigDict).

    Example:
      >>> config = {"small": {"sampler": "uniform", "batch_size": 4},
      ...           "uniform": {"sampler": "uniform", "batch_size": 64}}
      >>> names = ["uniform", "small"]  # the order of `names`, not the mapping's
      >>> [(c.name, c.batch_size, c.label) for c in conditions_from_config(config, names)]
      [('uniform', 64, 'Uniformly shuffled mini-batches'), ('small', 4, 'small')]
    """
    out = []
    for name in names:
        if name not in conditions:
            raise ValueError(
                f"run_conditions: {name!r} is not defined in conditions ({sorted(conditions)})."
            )
        fields = dict(conditions[name])
        unknown = set(fields) - {f.name for f in dataclasses.fields(Condition)}
        if unknown:
            raise ValueError(f"conditions.{name}: unknown keys {sorted(unknown)}.")
        out.append(Condition(name=name, **fields))
    if not out:
        raise ValueError("conditions: the study needs at least one condition.")
    return out


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid: a condition, a normalizer and a seed.

    `study` is 'table' for the main grid and 'sweep' for the batch-size sweep (a uniform
    condition per batch size). `num_steps` (None: the config's) and `lr_scale` (the learning
    rate's factor) let the sweep give every batch size the same budget of examples.

    Example:
      >>> uniform = Condition("uniform", "uniform", 32)
      >>> batch = Run(uniform, normalizer("batch"), seed=0)
      >>> Run(uniform, normalizer("batch+recalibration"), seed=0).training_key == batch.training_key
      True
      >>> Run(uniform, normalizer("batch"), seed=1).training_key == batch.training_key
      False
    """

    condition: Condition
    normalizer: Normalizer
    seed: int
    study: str = "table"
    num_steps: int | None = None
    lr_scale: float = 1.0

    @property
    def ghost_batch_size(self) -> int | None:
        """The normalizer's ghost batch size capped at the condition's batch size (None: whole
        batches). Training only: `bnjax.train.steps.make_model` leaves it out in evaluation."""
        ghost = self.normalizer.ghost_batch_size
        return None if ghost is None else min(ghost, self.condition.batch_size)

    @property
    def training_key(self) -> tuple:
        """Runs with equal keys share one training run (same batches, model and seed)."""
        c = self.condition
        return (
            c.sampler,
            c.batch_size,
            c.groups,
            c.skew,
            c.shuffle_batches,
            self.normalizer.norm,
            self.ghost_batch_size,
            self.num_steps,
            self.lr_scale,
            self.seed,
        )


def make_grid(
    conditions: Iterable[Condition],
    normalizer_names: Iterable[str],
    seeds: Iterable[int],
    *,
    sweep_batch_sizes: Iterable[int] = (),
    sweep_normalizers: Iterable[str] = (),
    ghost_batch_size: int = 8,
    num_steps: int | None = None,
    sweep_examples: int | None = None,
    sweep_reference_batch_size: int | None = None,
) -> list[Run]:
    """Every run of the study: conditions x normalizers x seeds, then the batch-size sweep.

    Main-grid runs train `num_steps` steps (None: the config's). A sweep run of batch size B
    trains `sweep_examples // B` steps (the same examples for every B, as in the Group Norm
    paper's fixed epochs; None: `num_steps`) at the learning rate times
    B / `sweep_reference_batch_size` (linear scaling, Goyal et al. 2017; None: unscaled).

    Example:
      >>> grid = make_grid([Condition("uniform", "uniform", 32)], ["batch", "group"], [0, 1],
      ...                  sweep_batch_sizes=[4, 32], sweep_normalizers=["batch"])
      >>> [(r.study, r.condition.batch_size, r.normalizer.name, r.seed) for r in grid][-2:]
      [('sweep', 32, 'batch', 0), ('sweep', 32, 'batch', 1)]
      >>> len(grid)
      8
      >>> sweep = make_grid([], [], [0], sweep_batch_sizes=[2, 32, 128],
      ...                   sweep_normalizers=["group"], num_steps=300, sweep_examples=9600,
      ...                   sweep_reference_batch_size=32)
      >>> [(r.num_steps, r.lr_scale) for r in sweep]
      [(4800, 0.0625), (300, 1.0), (75, 4.0)]
    """
    conditions, seeds = list(conditions), [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: the study needs at least one seed.")
    norms = [normalizer(n, ghost_batch_size) for n in normalizer_names]
    runs = [Run(c, n, s, num_steps=num_steps) for c in conditions for n in norms for s in seeds]
    for batch_size in sweep_batch_sizes:
        batch_size = int(batch_size)
        condition = Condition(
            f"uniform_b{batch_size}", "uniform", batch_size, label=f"uniform, batch {batch_size}"
        )
        steps = num_steps if sweep_examples is None else sweep_examples // batch_size
        scale = 1.0
        if sweep_reference_batch_size is not None:
            scale = batch_size / sweep_reference_batch_size
        for name in sweep_normalizers:
            n = normalizer(name, ghost_batch_size)
            runs += [
                Run(condition, n, s, study="sweep", num_steps=steps, lr_scale=scale) for s in seeds
            ]
    return runs
