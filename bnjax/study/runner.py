"""Runs the whole study and writes `results.csv`, `table.md`, `verdicts.md` and `plots/`.

    rows = run_study(config, workdir)        # what scripts/batch_study.py calls

For each dataset: the learning-rate sweep first (each normalizer's rate is the candidate with
the best mean validation accuracy), then the grid (`grid.make_grid`) at those rates. Runs that
differ only in their seed train together (vmapped); runs that would train the same thing
('batch' and 'batch+recalibration', a dose cell that is also a table cell) train once.

Resume: `results.csv` (and a small `artifacts/` file per run for the plots) is rewritten after
every cell, and `study_config.json` records the config; started again on the same workdir with
the same config, the study skips every run that has its row. The workdir mechanism is
training's (`bnjax.train.workdir`): the same lock (a second study, or a training run, on the
workdir stops at once), the same atomic writes, and the same config check: a change to a key
that changes what is computed is refused with `ConfigChangedError` naming each key, old ->
new (the rows would mix two studies); the `PRESENTATION_KEYS` may change.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from bnjax import data
from bnjax.progress import Progress
from bnjax.study import claims, grid, plots, report
from bnjax.study.experiment import Measured, Study, Trained
from bnjax.train import workdir as workdirs

TITLE = "Batch normalization under inconsistent mini-batch distributions: measured"
CONFIG_FILE = workdirs.STUDY_CONFIG_FILE
PREAMBLE = """
Every run of a dataset sees the same number of training examples (`example_budget`; steps =
budget / B). Each normalizer's learning rate was chosen by a sweep on uniform batches of the
reference size (best validation accuracy, on a split held out of training) and is scaled
linearly with B (rate x B / reference B). Convergence is measured on a fixed held-out probe (a
slice of that validation split), never on the training batches; accuracy on the test split.
"""


class StudyStartError(ValueError):
    """The study could not start (nothing trained, nothing written but the workdir): a config
    key out of range, a workdir that is a file or that another study or training run holds
    (its lock), a workdir holding another config's study (the `ConfigChangedError` naming
    each changed key is the `__cause__`) or a training run, results without their saved
    config, a damaged study_config.json, a results.csv that does not read back. The message
    names the key, file or line, and the fix. The study CLI exits 2 on it.

    Example:
      >>> from bnjax.study.defaults import quick_config
      >>> config = quick_config()
      >>> config.num_seeds = 0
      >>> run_study(config, "unused")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      bnjax.study.runner.StudyStartError: config.num_seeds=0: must be a positive integer.
    """


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
    for name in config.datasets:
        if name not in data.DATASETS:
            raise ValueError(f"config.datasets: {name!r} is not one of {tuple(data.DATASETS)}.")
    if not config.datasets:
        raise ValueError("config.datasets: the study needs at least one dataset.")
    for key in ("num_seeds", "lr_seeds", "example_budget", "eval_batch_size", "probe_points"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"config.{key}={config[key]!r}: must be a positive integer.")
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    largest = max([c.batch_size for c in conditions] + list(config.dose_batch_sizes))
    fractions = [1.0, *config.length_fractions]
    if round(config.example_budget * min(fractions)) // largest < 10:
        raise ValueError(
            f"config.example_budget={config.example_budget}: gives the largest batch "
            f"({largest}) fewer than 10 steps in the shortest run; raise it."
        )
    if not 0 <= config.warmup_fraction < 1:
        raise ValueError(f"config.warmup_fraction={config.warmup_fraction}: must be in [0, 1).")
    if not 0 < config.validation_fraction < 1:
        raise ValueError(
            f"config.validation_fraction={config.validation_fraction}: must be in (0, 1)."
        )
    if not config.lr_candidates:
        raise ValueError("config.lr_candidates: give at least one learning rate.")
    for name in (*config.normalizers, *config.dose_normalizers, *config.length_normalizers):
        grid.normalizer(name)  # raises naming the normalizer
    used = {
        "length_conditions": config.length_fractions,
        "momentum_conditions": config.other_bn_momenta,
    }
    for key, family in used.items():
        for name in config[key] if family else ():
            if name not in config.run_conditions:
                raise ValueError(f"config.{key}: {name!r} is not in run_conditions.")
    for skew in config.dose_skews:
        if not 0 <= skew <= 1:
            raise ValueError(f"config.dose_skews: {skew} is not in [0, 1].")
    for width in config.model_features:
        if width % config.norm_groups:
            raise ValueError(
                f"config.norm_groups={config.norm_groups} must divide every width in "
                f"config.model_features={tuple(config.model_features)} (group norm)."
            )


def load_splits(config, dataset: str) -> tuple[data.Dataset, data.Dataset, data.Dataset]:
    """(train, validation, test): the dataset's training split with `validation_fraction` of
    it held out (a fixed permutation from `data_seed`), and its test split. A dataset without
    sub-clusters (digits) gets 3 per class by k-means on the training split
    (`bnjax.data.kmeans_subclusters`), for the clustered conditions.

    Example:
      >>> from bnjax.study.defaults import quick_config
      >>> train, validation, test = load_splits(quick_config(), "clusters")
      >>> len(train), len(validation), len(test)
      (3200, 800, 1000)
    """
    options = {}
    if dataset == "clusters":
        options["config"] = data.ClusterConfig(**config.clusters.to_dict())
    full = data.load(dataset, "train", seed=config.data_seed, **options)
    test = data.load(dataset, "test", seed=config.data_seed, **options)
    if full.subclusters is None:
        full, test = data.kmeans_subclusters(full, test, seed=config.data_seed)
    order = np.random.default_rng(config.data_seed).permutation(len(full))
    held = round(len(full) * config.validation_fraction)
    return full.subset(np.sort(order[held:])), full.subset(np.sort(order[:held])), test


def choose_rates(rows: Sequence[dict], dataset: str) -> dict[str, float]:
    """{normalizer: rate} from the sweep's rows: the best mean validation accuracy (ties: the
    smaller rate); `batch+recalibration` and the like share their training normalizer's.

    Example:
      >>> rows = [{"dataset": "d", "family": "lr", "normalizer": "batch", "learning_rate": lr,
      ...          "validation_accuracy": a} for lr, a in ((0.05, 0.8), (0.1, 0.9), (0.2, 0.9))]
      >>> choose_rates(rows, "d")
      {'batch': 0.1}
    """
    scores: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["dataset"] == dataset and r["family"] == "lr":
            scores.setdefault(r["normalizer"], {}).setdefault(r["learning_rate"], []).append(
                r["validation_accuracy"]
            )
    return {
        n: max(sorted(by_rate), key=lambda rate, b=by_rate: np.mean(b[rate]))
        for n, by_rate in scores.items()
    }


ROW_ID_KEYS = (
    "dataset",
    "family",
    "condition",
    "normalizer",
    "seed",
    "learning_rate",
    "bn_momentum",
    "examples",
)


def row_id(row_or_run) -> tuple:
    """What identifies a results row (and the run that makes it), for resume.

    Example:
      >>> row_id({"dataset": "d", "family": "table", "condition": "u", "normalizer": "batch",
      ...         "seed": 0, "learning_rate": 0.05, "bn_momentum": 0.9, "examples": 9600})
      ('d', 'table', 'u', 'batch', 0, 0.05, 0.9, 9600)
    """
    # A run is identified by the columns its row will carry (`row_id_fields`).
    r = row_id_fields(row_or_run) if isinstance(row_or_run, grid.Run) else row_or_run
    values = tuple(r[k] for k in ROW_ID_KEYS)
    *head, rate, momentum, examples = values
    return (*head, round(float(rate), 10), round(float(momentum), 10), int(examples))


# Keys that change how results are shown, not what a run computes: a resumed study may change
# them (e.g. --config.plots=False), every other key must match the workdir's (the study's
# bookkeeping keys, in `bnjax.train.workdir`'s terms).
PRESENTATION_KEYS = ("plots", "progress", "bootstrap_resamples")

# What a study's user can do about a refused config change (the study has no override).
_CHANGE_REMEDY = (
    "The rows would mix two studies: use the saved values, a new --workdir, or empty this one "
    "to start over."
)


def _claim_resume(config, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """The rows an earlier run of the same config left in `workdir` (none for a new one); saves
    `config` as the workdir's (`workdirs.save_config`, as training does). Call it holding the
    workdir's lock.

    Refused (ValueError, before anything trains): a config other than the saved one
    (`workdirs.ConfigChangedError` naming each changed key outside `PRESENTATION_KEYS`; changed
    presentation keys are logged), a study_config.json that does not read
    (`workdirs.ConfigFileError`), results without a saved config (nothing to check them
    against), and a results.csv that does not read back (`report.read_csv`: a garbage line,
    text in a numeric cell, a run twice).
    """
    csv_path = os.path.join(workdir, "results.csv")
    saved = workdirs.load_config(workdir, CONFIG_FILE)
    if saved is None and os.path.exists(csv_path):
        # Resuming would keep rows made with a config nobody can check any more (another
        # learning rate, say) and mix them with new ones.
        raise ValueError(
            f"{workdir} holds results.csv but its {CONFIG_FILE} is missing, so the config the "
            f"results were made with cannot be checked; restore {CONFIG_FILE}, or use a new "
            "--workdir (or empty this one to start over)."
        )
    changes = workdirs.check_resume_config(
        saved,
        config,
        allow_changes=False,
        bookkeeping_keys=PRESENTATION_KEYS,
        remedy=_CHANGE_REMEDY,
    )
    rows = read_results(csv_path) if os.path.exists(csv_path) else []
    for change in changes:
        log(f"note: resuming with {change}")
    # Rewritten on every start (as training's config.json): the presentation values in effect,
    # and an old-format file (written before the shared format) becomes the current one.
    workdirs.save_config(config, workdir, CONFIG_FILE)
    return rows


def read_results(path: str) -> list[dict]:
    """The rows of a study's results.csv, validated (`report.read_csv`): every run key column
    present in each row, and each run at most once. Deleting a row is always safe: a resumed
    study trains that run again.

    Example:
      >>> import tempfile
      >>> row = {"dataset": "d", "family": "table", "condition": "u", "normalizer": "batch",
      ...        "seed": 0, "learning_rate": 0.05, "bn_momentum": 0.9, "examples": 9600}
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     path = os.path.join(workdir, "results.csv")
      ...     report.write_csv([row, row], path)
      ...     read_results(path)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: .../results.csv, line 3: the run of line 2 again (an exact copy); ...
    """
    return report.read_csv(path, required=ROW_ID_KEYS, key=row_id)


def _lock_workdir(workdir: str) -> workdirs.WorkdirLock:
    """The workdir checked (`workdirs.check_workdir`, created if missing) and locked, as a
    training run's: raises ValueError (a `workdirs.WorkdirError`) when it cannot hold the
    study and `workdirs.WorkdirBusyError` when another study or run holds it."""
    workdirs.check_workdir(workdir, workdirs.STUDY)
    try:
        return workdirs.WorkdirLock(workdir).acquire()
    except workdirs.WorkdirReadOnlyError as error:
        # Its wording is training's (a finished run still reports); a study always writes.
        cause = str(error).split(";")[0]
        raise workdirs.WorkdirReadOnlyError(
            f"{cause}; the study needs write access: fix the permissions or choose another "
            "--workdir"
        ) from error
    except OSError as error:  # e.g. a parent that cannot be created
        raise ValueError(f"--workdir {workdir}: cannot create it ({error.strerror}).") from error


def _artifact_path(workdir: str, run: grid.Run) -> str:
    digest = hashlib.sha1(repr(row_id(run)).encode()).hexdigest()[:16]
    return os.path.join(workdir, "artifacts", f"{digest}.npz")


def _save_artifacts(workdir: str, run: grid.Run, trained: Trained, measured: Measured) -> None:
    """What the plots draw that results.csv does not hold: the probe curve, and for the first
    seed the batch-mean trajectories of layer 0 and the deepest layer (every 4th step), the
    population, and the test features."""
    t = trained.trace
    arrays = {
        "probe_steps": t.probe_steps,
        "probe_loss": t.probe_loss,
        "probe_accuracy": t.probe_accuracy,
    }
    if run.seed == 0 and run.family == "table":
        for name, layer in (("first", 0), ("deep", len(t.batch_means) - 1)):
            arrays[f"trajectory_{name}"] = t.batch_means[layer][::4, :4].astype(np.float32)
            pop_mean, pop_var = measured.population[layer]
            arrays[f"population_{name}"] = np.stack([pop_mean[:4], pop_var[:4]])
        arrays["features"] = measured.features[:1000].astype(np.float32)
        arrays["labels"] = measured.labels[:1000]
    path = _artifact_path(workdir, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Into a buffer, then `workdirs.write_atomically`: a kill never leaves a truncated .npz
    # that would break the plots of the resumed study.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    workdirs.write_atomically(path, buffer.getvalue())


def load_artifacts(workdir: str, run: grid.Run) -> dict | None:
    """The run's artifacts (`_save_artifacts`), or None if it has none.

    Example:
      >>> import tempfile
      >>> run = grid.Run("d", "table", grid.Condition("u", "uniform", 8),
      ...                grid.normalizer("batch"), 0, 10, 0.1, 0.9)
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     print(load_artifacts(workdir, run))
      None
    """
    path = _artifact_path(workdir, run)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return dict(f)


def _print(message: str) -> None:
    print(message, flush=True)


class _Executor:
    """Trains and measures runs cell by cell, appending rows and saving after each cell."""

    def __init__(self, config, workdir: str, rows: list[dict], log, total: int):
        self.config, self.workdir, self.rows = config, workdir, rows
        self.done = {row_id(r) for r in rows}
        self.progress = Progress("study", total, enabled=config.progress, log=log)
        self.started = time.perf_counter()
        self.trained_cells = 0
        self.completed = 0

    def run(self, study: Study, runs: Sequence[grid.Run]) -> None:
        pending = [r for r in runs if row_id(r) not in self.done]
        self.completed += len(runs) - len(pending)  # resumed rows
        self.progress.update(self.completed)
        cells: dict[tuple, list[grid.Run]] = {}
        for r in pending:
            cells.setdefault(r.group_key, []).append(r)
        for cell in cells.values():
            seeds = sorted({r.seed for r in cell})
            representative = {r.seed: r for r in reversed(cell)}
            trained = dict(zip(seeds, study.train([representative[s] for s in seeds]), strict=True))
            self.trained_cells += 1
            measured_cache: dict[tuple, Measured] = {}
            for r in cell:
                key = (r.seed, r.normalizer.recalibrate)
                if key not in measured_cache:
                    measured_cache[key] = study.measure(r, trained[r.seed])
                m = measured_cache[key]
                row = dict(m.row)
                row.update(row_id_fields(r))
                self.rows.append(row)
                self.done.add(row_id(r))
                _save_artifacts(self.workdir, r, trained[r.seed], m)
                self.completed += 1
                self.progress.update(
                    self.completed,
                    f"{r.dataset} {r.family} {r.condition.name} {r.normalizer.name} seed "
                    f"{r.seed}: accuracy {row['accuracy_eval']:.3f}  "
                    f"({time.perf_counter() - self.started:.0f} s)",
                )
            report.write_csv(self.rows, os.path.join(self.workdir, "results.csv"))


def row_id_fields(run: grid.Run) -> dict:
    """The identifying columns of a run's row (a measured row shared by several runs gets each
    run's own).

    Example:
      >>> run = grid.Run("d", "dose", grid.Condition("b8_s0", "uniform", 8),
      ...                grid.normalizer("batch"), 1, 10, 0.1, 0.9)
      >>> fields = row_id_fields(run)
      >>> fields["family"], fields["condition"], fields["examples"]
      ('dose', 'b8_s0', 80)
    """
    return {
        "dataset": run.dataset,
        "family": run.family,
        "condition": run.condition.name,
        "normalizer": run.normalizer.name,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "bn_momentum": run.bn_momentum,
        "examples": run.examples,
        "num_steps": run.num_steps,
    }


def planned_runs(config) -> int:
    """How many rows the study will write (sweep + grid, every dataset).

    Example:
      >>> from bnjax.study.defaults import quick_config
      >>> planned_runs(quick_config())
      46
    """
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    per_dataset = len(rate_sweep(config, "x")) + len(
        grid.make_grid("x", config, {n: 0.1 for n in grid.NORMALIZERS}, conditions)
    )
    return per_dataset * len(config.datasets)


def rate_sweep(config, dataset: str) -> list[grid.Run]:
    """The config's learning-rate sweep for `dataset` (`grid.lr_sweep_runs`).

    Example:
      >>> from bnjax.study.defaults import quick_config
      >>> len(rate_sweep(quick_config(), "clusters"))  # 3 trained normalizers x 2 rates x 1
      6
    """
    return grid.lr_sweep_runs(
        dataset,
        config.normalizers,
        config.lr_candidates,
        range(config.lr_seeds),
        batch_size=config.reference_batch_size,
        example_budget=config.example_budget,
        bn_momentum=config.bn_momentum,
        ghost_batch_size=config.ghost_batch_size,
    )


def run_study(config, workdir: str, *, log: Callable[[str], None] = _print) -> list[dict]:
    """Runs (or resumes) every run of `config`; writes results.csv, table.md, verdicts.md and
    plots/ to `workdir`. Returns the rows of results.csv.

    Example (a tiny grid: one dataset, one condition, two normalizers; about 30 seconds):
      >>> import tempfile
      >>> from bnjax.study.defaults import quick_config
      >>> config = quick_config()
      >>> config.run_conditions, config.normalizers = ("uniform",), ("batch", "none")
      >>> config.dose_skews, config.lr_candidates, config.num_seeds = (), (0.1,), 2
      >>> config.plots, config.progress = False, False
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     rows = run_study(config, workdir, log=lambda line: None)
      ...     written = sorted(os.listdir(workdir))
      >>> len(rows), sorted({r["family"] for r in rows})
      (6, ['lr', 'table'])
      >>> written
      ['.lock', 'artifacts', 'results.csv', 'study_config.json', 'table.md', 'verdicts.md']
    """
    try:
        check_study_config(config)
        lock_existed = os.path.exists(os.path.join(workdir, ".lock")) if workdir else False
        lock = _lock_workdir(workdir)
    except (ValueError, workdirs.WorkdirBusyError) as error:
        raise StudyStartError(str(error)) from error
    with lock:
        try:
            rows = _claim_resume(config, workdir, log)
        except ValueError as error:
            if not lock_existed:
                # A refused start leaves the workdir as it was. Safe while locked: a run that
                # opens the path after this creates a new lock file, and this one does nothing
                # more.
                os.remove(lock.path)
            raise StudyStartError(str(error)) from error
        return _run_claimed(config, workdir, rows, log)


def _run_claimed(config, workdir: str, rows: list[dict], log) -> list[dict]:
    """`run_study` once the workdir is locked and its `rows` resumed."""
    if rows:
        log(f"resuming: {len(rows)} runs already in {workdir}/results.csv")
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    labels = {c.name: c.label for c in conditions}
    executor = _Executor(config, workdir, rows, log, planned_runs(config))
    chosen: dict[tuple[str, str], float] = {}
    all_runs: list[grid.Run] = []
    classes: dict[str, int] = {}
    try:
        for dataset in config.datasets:
            train, validation, test = load_splits(config, dataset)
            study = Study(config, train, validation, test)
            classes[dataset] = train.num_classes
            sweep = rate_sweep(config, dataset)
            executor.run(study, sweep)
            rates = choose_rates(executor.rows, dataset)
            chosen.update({(dataset, n): rate for n, rate in rates.items()})
            runs = grid.make_grid(dataset, config, rates, conditions)
            executor.run(study, runs)
            all_runs += sweep + runs
    finally:
        executor.progress.close()
    rows = executor.rows
    budgets = {d: config.example_budget for d in config.datasets}
    deep = report.deepest_layer(rows)
    verdicts = claims.verdicts(
        rows,
        claims.study_claims(
            deepest_layer=deep,
            budget=config.example_budget,
            length_fractions=config.length_fractions,
            other_momenta=config.other_bn_momenta,
        ),
        momentum=config.bn_momentum,
        budgets=budgets,
        resamples=config.bootstrap_resamples,
    )
    table = report.table_markdown(
        rows, labels, chosen, title=TITLE, preamble=PREAMBLE, resamples=config.bootstrap_resamples
    )
    workdirs.write_atomically(os.path.join(workdir, "table.md"), table)
    workdirs.write_atomically(
        os.path.join(workdir, "verdicts.md"),
        report.verdicts_markdown(verdicts, title=f"{TITLE}: the claims, one by one"),
    )
    if config.plots:
        write_plots(rows, all_runs, labels, workdir, classes)
    seconds = time.perf_counter() - executor.started
    log(
        f"study finished: {len(rows)} runs ({executor.trained_cells} cells trained now) in "
        f"{seconds:.0f} s; wrote {workdir}/results.csv, table.md, verdicts.md"
        + (", plots/" if config.plots else "")
    )
    return rows


def write_plots(rows, runs: Sequence[grid.Run], labels, workdir: str, classes) -> list[str]:
    """Every figure of `bnjax.study.plots` (into workdir/plots); returns the paths written.
    `classes` is {dataset: number of classes} (the chance lines).

    Example (rows only, no saved artifacts: the figures drawn from results.csv alone):
      >>> import tempfile
      >>> rows = [{"dataset": "d", "family": "table", "condition": "u", "normalizer": "batch",
      ...          "seed": s, "accuracy_eval": 0.9, "stability_excess_mean_l0": 0.0,
      ...          "running_mean_bias_l0": 0.1, "running_var_bias_l0": 0.1} for s in range(2)]
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     paths = write_plots(rows, [], {}, workdir, {"d": 10})
      >>> sorted(os.path.basename(p) for p in paths)
      ['headline.png', 'probe_curves.png', 'running_bias.png', 'stability_by_layer.png']
    """
    directory = os.path.join(workdir, "plots")
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    rows = report.with_layer_means(rows)
    curves: dict = {}
    firsts: dict = {}
    for run in runs:
        if run.family != "table" or run.normalizer.recalibrate:
            continue
        art = load_artifacts(workdir, run)
        if art is None:
            continue
        key = (run.dataset, run.condition.name, run.normalizer.name)
        curves.setdefault(key, []).append(
            (art["probe_steps"] * run.condition.batch_size, art["probe_loss"])
        )
        if "features" in art and run.normalizer.name == "batch":
            firsts[(run.dataset, run.condition.name)] = art
    chance = {d: 1 / n for d, n in classes.items()}
    written = [
        plots.headline(rows, labels, path("headline.png"), chance=chance),
        plots.dose_response(rows, path("dose_response.png")),
        plots.probe_curves(curves, labels, path("probe_curves.png")),
        plots.running_bias_by_layer(rows, labels, path("running_bias.png")),
        plots.stability_by_layer(rows, labels, path("stability_by_layer.png")),
    ]
    if firsts:
        written.append(plots.batch_statistics(firsts, labels, path("batch_statistics.png")))
        written.append(plots.features_pca(firsts, labels, path("features_pca.png")))
    return [p for p in written if p]
