"""Runs the whole study grid and writes `results.csv`, `table.md` and `plots/` to a workdir.

    rows = run_study(config, workdir)        # what scripts/batch_study.py calls

Runs that would train the same thing (same batches, model and seed; e.g. 'batch' and
'batch+recalibration', or the sweep's batch 32 and the uniform condition) train once, and
runs that would measure the same thing are measured once. `results.csv` is rewritten after
every run, so an interrupted study keeps what it finished.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import ml_collections

from bnjax import data
from bnjax.progress import Progress
from bnjax.study import grid, plots, report
from bnjax.study.experiment import Measured, Study, Trained

SCALES = ("small", "full")
TITLE = "Batch normalization under inconsistent mini-batch distributions: measured"


def resolve_scale(config) -> ml_collections.ConfigDict:
    """A copy of `config` with `config.full`'s keys applied when `config.scale == 'full'`.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> config = study_config()
      >>> config.scale = "full"
      >>> resolve_scale(config).num_steps, config.num_steps
      (2000, 300)
    """
    if config.scale not in SCALES:
        raise ValueError(f"config.scale={config.scale!r}: choose one of {SCALES}.")
    resolved = ml_collections.ConfigDict(config.to_dict())
    if config.scale == "full":
        for key, value in config.full.items():
            if key not in resolved:
                raise ValueError(f"config.full.{key}: not a study key; check the spelling.")
            resolved[key] = value
    return resolved


def check_study_config(config) -> None:
    """Fail fast, naming the key, before any run trains.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> config = study_config()
      >>> config.norm_groups = 5
      >>> check_study_config(config)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: config.norm_groups=5 must divide every width in ... (group norm).
    """
    if config.dataset not in data.DATASETS:
        raise ValueError(
            f"config.dataset={config.dataset!r}: choose one of {tuple(data.DATASETS)}."
        )
    for key in ("num_seeds", "num_steps", "eval_batch_size", "recalibration_batch_size"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"config.{key}={config[key]!r}: must be a positive integer.")
    if config.num_steps < 20:
        raise ValueError(f"config.num_steps={config.num_steps}: the metrics need >= 20 steps.")
    if not 0 <= config.warmup_steps < config.num_steps:
        raise ValueError(
            f"config.warmup_steps={config.warmup_steps}: must be in [0, num_steps="
            f"{config.num_steps}) (the learning rate warms up, then decays)."
        )
    if config.sweep_batch_sizes and config.sweep_examples // max(config.sweep_batch_sizes) < 20:
        raise ValueError(
            f"config.sweep_examples={config.sweep_examples}: gives the largest sweep batch "
            f"({max(config.sweep_batch_sizes)}) fewer than 20 steps; raise it."
        )
    if not 0 < config.stability_window <= 1:
        raise ValueError(f"config.stability_window={config.stability_window}: must be in (0, 1].")
    for name in config.normalizers:
        grid.normalizer(name)  # raises naming the normalizer
    for name in config.sweep_normalizers:
        grid.normalizer(name)
    for width in config.model_features:
        if width % config.norm_groups:
            raise ValueError(
                f"config.norm_groups={config.norm_groups} must divide every width in "
                f"config.model_features={tuple(config.model_features)} (group norm)."
            )


@dataclasses.dataclass
class Artifacts:
    """What the plots draw, gathered while the grid runs (first seed where one run suffices).

    `losses[(condition, normalizer)]` holds every seed's (T,) loss curve; the rest hold batch
    norm's first seed per condition: per-layer (T, C) batch means (`trajectories`), per-layer
    population (mean, var), `running_pairs[condition][normalizer]` = (running, population)
    of the deepest layer, and held-out (features, labels).

    Example:
      >>> Artifacts().losses[("uniform", "batch")]
      []
    """

    losses: dict = dataclasses.field(default_factory=lambda: defaultdict(list))
    trajectories: dict = dataclasses.field(default_factory=dict)  # condition -> per layer
    population: dict = dataclasses.field(default_factory=dict)  # condition -> per layer
    running_pairs: dict = dataclasses.field(default_factory=lambda: defaultdict(dict))
    features: dict = dataclasses.field(default_factory=dict)  # condition -> (features, labels)

    def add(self, run: grid.Run, first_seed: bool, trained: Trained, measured: Measured):
        c, n = run.condition.name, run.normalizer.name
        if run.study != "table":
            return
        if not run.normalizer.recalibrate:
            self.losses[(c, n)].append(trained.trace.loss)
        if not first_seed or run.normalizer.norm != "batch":
            return
        if measured.running is not None and run.normalizer.ghost_batch_size is None:
            self.running_pairs[c][n] = (measured.running[-1], measured.population[-1])
        if n == "batch":
            self.trajectories[c] = trained.trace.batch_means
            self.population[c] = measured.population
            self.features[c] = (measured.features, measured.labels)


def make_runs(config) -> list[grid.Run]:
    """The config's grid (`grid.make_grid`).

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> runs = make_runs(study_config())
      >>> len(runs), sum(r.study == "sweep" for r in runs)
      (153, 63)
    """
    return grid.make_grid(
        grid.conditions_from_config(config.conditions, config.run_conditions),
        config.normalizers,
        range(config.num_seeds),
        sweep_batch_sizes=config.sweep_batch_sizes,
        sweep_normalizers=config.sweep_normalizers,
        ghost_batch_size=config.ghost_batch_size,
        num_steps=config.num_steps,
        sweep_examples=config.sweep_examples,
        sweep_reference_batch_size=config.sweep_reference_batch_size,
    )


def _print(message: str) -> None:
    print(message, flush=True)


def run_study(config, workdir: str, *, log: Callable[[str], None] = _print) -> list[dict]:
    """Trains and measures every run of `config` (scale resolved); writes the outputs.

    Returns the rows of `results.csv`. `log` receives a line per run (when no progress bar
    shows) and the closing summary.

    Example (the smallest grid: one condition, one normalizer, one seed; a few seconds):
      >>> import tempfile
      >>> from bnjax.study.defaults import study_config
      >>> config = study_config()
      >>> config.num_steps, config.warmup_steps, config.num_seeds = 20, 4, 1
      >>> config.model_features = (8,)
      >>> config.run_conditions, config.normalizers = ("skewed",), ("batch",)
      >>> config.sweep_batch_sizes, config.plots, config.progress = (), False, False
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     rows = run_study(config, workdir, log=lambda line: None)
      ...     written = sorted(os.listdir(workdir))
      >>> len(rows), rows[0]["condition"], written
      (1, 'skewed', ['results.csv', 'table.md'])
    """
    config = resolve_scale(config)
    check_study_config(config)
    os.makedirs(workdir, exist_ok=True)
    runs = make_runs(config)
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    labels = {c.name: c.label for c in conditions}
    train = data.load(config.dataset, "train", seed=config.data_seed)
    test = data.load(config.dataset, "test", seed=config.data_seed)
    study = Study(config, train, test)
    trained_runs: dict[tuple, Trained] = {}
    # A trained run (variables and per-step trace) is freed once no later run shares it.
    uses_left = Counter(run.training_key for run in runs)
    trained_count = 0
    measured_runs: dict[tuple, Measured] = {}
    artifacts, rows = Artifacts(), []
    started = time.perf_counter()
    progress = Progress("study", len(runs), enabled=config.progress, log=log)
    csv_path = os.path.join(workdir, "results.csv")
    try:
        for number, run in enumerate(runs, start=1):
            key = run.training_key
            if key not in trained_runs:
                trained_runs[key] = study.train(run)
                trained_count += 1
            trained = trained_runs[key]
            measure_key = (key, run.normalizer.recalibrate)
            if measure_key not in measured_runs:
                measured_runs[measure_key] = study.measure(run, trained)
            measured = measured_runs[measure_key]
            uses_left[key] -= 1
            if not uses_left[key]:
                del trained_runs[key]
            row = dict(
                measured.row,
                study=run.study,
                condition=run.condition.name,
                normalizer=run.normalizer.name,
            )
            rows.append(row)
            artifacts.add(run, run.seed == 0, trained, measured)
            report.write_csv(rows, csv_path)
            progress.advance(
                f"[{number}/{len(runs)}] {run.study} {run.condition.name} "
                f"{run.normalizer.name} seed {run.seed}: accuracy (eval) "
                f"{row['accuracy_eval']:.3f}, final loss {row['final_loss']:.3f}  "
                f"({time.perf_counter() - started:.0f} s)"
            )
    finally:
        progress.close()
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(report.table_markdown(rows, labels, title=TITLE))
    if config.plots:
        write_plots(
            rows, artifacts, labels, os.path.join(workdir, "plots"), chance=1 / train.num_classes
        )
    log(
        f"study finished: {len(runs)} runs ({trained_count} trained) in "
        f"{time.perf_counter() - started:.0f} s; wrote {workdir}/results.csv, table.md"
        + (", plots/" if config.plots else "")
    )
    return rows


def write_plots(
    rows, artifacts: Artifacts, labels, directory: str, chance: float | None = None
) -> list[str]:
    """Every figure of `bnjax.study.plots` that the study's runs give data for; returns the
    paths written (`run_study` calls it; its test draws every figure).

    Example (rows without sweep or training artifacts: the headline and loss curves only):
      >>> import tempfile
      >>> rows = [{"study": "table", "condition": "u", "normalizer": "batch", "seed": 0,
      ...          "accuracy_eval": 0.9}]
      >>> artifacts = Artifacts()
      >>> artifacts.losses[("u", "batch")].append(np.linspace(2, 0.1, 30))
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     paths = write_plots(rows, artifacts, {"u": "uniform"}, directory)
      >>> [os.path.basename(p) for p in paths]
      ['headline.png', 'loss_curves.png']
    """
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    written = []
    if any(r["study"] == "table" for r in rows):
        written.append(plots.headline(rows, labels, path("headline.png"), chance=chance))
        written.append(plots.loss_curves(artifacts.losses, labels, path("loss_curves.png")))
    if artifacts.trajectories:
        written.append(
            plots.batch_statistics(
                artifacts.trajectories, artifacts.population, labels, path("batch_statistics.png")
            )
        )
        written.append(plots.features_pca(artifacts.features, labels, path("features_pca.png")))
    if artifacts.running_pairs:
        written.append(
            plots.running_vs_population(
                artifacts.running_pairs, labels, path("running_vs_population.png")
            )
        )
    if any(r["study"] == "sweep" for r in rows):
        written.append(plots.accuracy_vs_batch_size(rows, path("accuracy_vs_batch_size.png")))
    return written
