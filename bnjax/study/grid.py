"""What the batch-composition study runs: conditions, normalizers, families and the grid of runs.

A run is one (dataset, family, condition, normalizer, seed) with its learning rate, BN momentum
and number of steps. Every run of a dataset sees the same number of training examples (the
`example_budget`), so a run at batch size B trains `budget // B` steps. The paper's training
conditions are batch compositions:

    name                 paper's row                                        sampler, B
    uniform              Uniformly shuffled mini-batches                   uniform, 32
    clustered_stream     Clustered similar samples in batches (the paper's  one sub-cluster per
                         consecutive stream)                               batch, in order, 32
    clustered_shuffled   the same batches in random order                  idem, shuffled, 32
    skewed               Synthetic class-skewed mini-batches               80% one class, 32
    small_batch          Small batch size with distribution consistency    uniform, 4
    large_inconsistent   Large batch size with distribution inconsistency  80% one class, 128

and the normalizers ('batch' is the paper's subject, 'none' the control, the rest are fixes):

    none                 no normalization (the convolutions carry a bias)
    batch                batch norm
    batch_renorm         batch renormalization (Ioffe 2017), bounds warmed up over the run
    group, layer         statistics per example: independent of batch composition
    ghost_batch          batch norm over groups of `ghost_batch_size` examples
    batch+recalibration  the `batch` run, its running statistics then replaced by precise
                         population statistics (`bnjax.lifecycle.recalibrate`)

The families of runs:

    lr        the learning-rate sweep: uniform batches of the reference size, every candidate
              learning rate; each normalizer's rate is the one with the best validation accuracy
    table     conditions x normalizers at the chosen rates (times B / reference B: linear
              scaling, Goyal et al. 2017)
    dose      skew levels x batch sizes x a few normalizers (the dose-response)
    momentum  some of the table's conditions with batch norm at another BN momentum
    length    shorter training (fractions of the budget) for a few conditions and normalizers

Runs with the same `training_key` train once ('batch' and 'batch+recalibration'; a dose cell
that is also a table cell); runs with the same `group_key` differ only in the seed and train
together (vmapped over seeds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from bnjax.data import GROUPINGS, SAMPLERS

# The paper's row labels, in its order (both clustered variants are its second row).
PAPER_LABELS = {
    "uniform": "Uniformly shuffled mini-batches",
    "clustered_stream": "Clustered similar samples in batches (consecutive stream)",
    "clustered_shuffled": "Clustered similar samples in batches (batches shuffled)",
    "skewed": "Synthetic class-skewed mini-batches",
    "small_batch": "Small batch size with distribution consistency",
    "large_inconsistent": "Large batch size with distribution inconsistency",
}
FAMILIES = ("lr", "table", "dose", "momentum", "length")


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

    @property
    def iid(self) -> Condition:
        """The i.i.d. baseline at the same batch size: uniform batches of B.

        Example:
          >>> Condition("s", "skewed", 64, skew=0.9).iid.sampler
          'uniform'
        """
        return Condition(f"{self.name}_iid", "uniform", self.batch_size)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """How the network normalizes: a `bnjax.models` norm plus options.

    Attributes:
      name: one of NORMALIZERS.
      norm: the model's `norm` ('none', 'batch', 'batch_renorm', 'group', 'layer').
      ghost_batch_size: batch norm statistics over groups of this many examples (None: whole
        batch); capped at the run's batch size.
      recalibrate: replace the running statistics by precise ones after training.

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
        """The normalizer whose training run this one shares (itself unless recalibrate)."""
        return "batch" if self.recalibrate else self.name

    @property
    def has_running_stats(self) -> bool:
        """Whether `norm` keeps running statistics (batch, batch_renorm)."""
        return self.norm in ("batch", "batch_renorm")


# The registry: name -> build(ghost_batch_size). Its keys are the valid normalizer names, in
# the table's column order.
NORMALIZERS = {
    "none": lambda ghost_batch_size: Normalizer("none", "none"),
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
    """One training run: a dataset, a family, a condition, a normalizer and a seed.

    `num_steps` is the example budget over the batch size; `learning_rate` the chosen rate
    (already scaled to the batch size); `bn_momentum` the decay of the running averages.

    Example:
      >>> uniform = Condition("uniform", "uniform", 32)
      >>> batch = Run("clusters", "table", uniform, normalizer("batch"), 0, 300, 0.05, 0.9)
      >>> recal = dataclasses.replace(batch, normalizer=normalizer("batch+recalibration"))
      >>> recal.training_key == batch.training_key, batch.examples
      (True, 9600)
      >>> dataclasses.replace(batch, seed=1).group_key == batch.group_key
      True
    """

    dataset: str
    family: str
    condition: Condition
    normalizer: Normalizer
    seed: int
    num_steps: int
    learning_rate: float
    bn_momentum: float

    @property
    def examples(self) -> int:
        """Training examples the run sees: steps x batch size."""
        return self.num_steps * self.condition.batch_size

    @property
    def ghost_batch_size(self) -> int | None:
        """The normalizer's ghost batch size capped at the condition's batch size (None: whole
        batches). Training only: `bnjax.train.steps.make_model` leaves it out in evaluation."""
        ghost = self.normalizer.ghost_batch_size
        return None if ghost is None else min(ghost, self.condition.batch_size)

    @property
    def group_key(self) -> tuple:
        """Runs with equal keys train the same network on differently seeded batches: they
        train together, vmapped over seeds. The family is not part of it (runs shared across
        families train once); the momentum only where the norm keeps running statistics."""
        c = self.condition
        momentum = self.bn_momentum if self.normalizer.has_running_stats else None
        return (
            self.dataset,
            c.sampler,
            c.batch_size,
            c.groups,
            c.skew,
            c.shuffle_batches,
            self.normalizer.norm,
            self.ghost_batch_size,
            self.num_steps,
            round(self.learning_rate, 12),
            momentum,
        )

    @property
    def training_key(self) -> tuple:
        """Runs with equal keys share one training run (same batches, model and seed)."""
        return (*self.group_key, self.seed)


def scaled_learning_rate(rate: float, batch_size: int, reference_batch_size: int) -> float:
    """`rate` (chosen at the reference batch size) times B / reference (linear scaling).

    Example:
      >>> scaled_learning_rate(0.1, 128, 32), scaled_learning_rate(0.1, 4, 32)
      (0.4, 0.0125)
    """
    return rate * batch_size / reference_batch_size


def lr_sweep_runs(
    dataset: str,
    normalizer_names: Sequence[str],
    candidates: Sequence[float],
    seeds: Iterable[int],
    *,
    batch_size: int,
    example_budget: int,
    bn_momentum: float,
    ghost_batch_size: int = 8,
) -> list[Run]:
    """The learning-rate sweep: uniform batches of `batch_size`, every candidate rate, for each
    normalizer that trains (`batch+recalibration` shares `batch`'s rate).

    Example:
      >>> runs = lr_sweep_runs("digits", ["batch", "batch+recalibration", "group"], [0.05, 0.1],
      ...                      [0, 1], batch_size=32, example_budget=3200, bn_momentum=0.9)
      >>> len(runs), {r.num_steps for r in runs}, sorted({r.normalizer.name for r in runs})
      (8, {100}, ['batch', 'group'])
    """
    uniform = Condition("uniform", "uniform", batch_size)
    names = [n for n in normalizer_names if not normalizer(n).recalibrate]
    return [
        Run(
            dataset,
            "lr",
            uniform,
            normalizer(name, ghost_batch_size),
            int(seed),
            example_budget // batch_size,
            float(rate),
            bn_momentum,
        )
        for name in names
        for rate in candidates
        for seed in seeds
    ]


def make_grid(
    dataset: str,
    config,
    rates: Mapping[str, float],
    conditions: Sequence[Condition],
) -> list[Run]:
    """Every run after the learning-rate sweep, for one dataset: table, dose, momentum, length.

    `rates[normalizer]` is the rate chosen at `config.reference_batch_size`
    (`batch+recalibration` uses `batch`'s); each run's rate is scaled to its batch size.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> config = study_config()
      >>> conditions = conditions_from_config(config.conditions, config.run_conditions)
      >>> rates = {name: 0.05 for name in NORMALIZERS}
      >>> runs = make_grid("clusters", config, rates, conditions)
      >>> sorted({r.family for r in runs})
      ['dose', 'length', 'momentum', 'table']
      >>> {r.examples for r in runs if r.family != "length"} == {config.example_budget}
      True
    """
    seeds = range(config.num_seeds)
    ghost = config.ghost_batch_size
    budget = config.example_budget

    def run(family, condition, name, seed, *, momentum=None, budget=budget):
        n = normalizer(name, ghost)
        rate = rates[n.trains_as]
        return Run(
            dataset,
            family,
            condition,
            n,
            int(seed),
            budget // condition.batch_size,
            scaled_learning_rate(rate, condition.batch_size, config.reference_batch_size),
            config.bn_momentum if momentum is None else momentum,
        )

    runs = [run("table", c, n, s) for c in conditions for n in config.normalizers for s in seeds]
    for batch_size in config.dose_batch_sizes:
        for skew in config.dose_skews:
            # Skew 0 is i.i.d. batches: the uniform sampler, not a skewed one with no skew.
            c = (
                Condition(f"b{batch_size}_s0", "uniform", int(batch_size), label="skew 0")
                if skew == 0
                else Condition(
                    f"b{batch_size}_s{skew:g}",
                    "skewed",
                    int(batch_size),
                    skew=float(skew),
                    label=f"skew {skew:g}",
                )
            )
            runs += [run("dose", c, n, s) for n in config.dose_normalizers for s in seeds]
    by_name = {c.name: c for c in conditions}
    for momentum in config.other_bn_momenta:
        runs += [
            run("momentum", by_name[c], n, s, momentum=momentum)
            for c in config.momentum_conditions
            for n in ("batch", "batch+recalibration")
            for s in seeds
        ]
    for fraction in config.length_fractions:
        runs += [
            run("length", by_name[c], n, s, budget=round(budget * fraction))
            for c in config.length_conditions
            for n in config.length_normalizers
            for s in seeds
        ]
    return runs
