"""Train the runs of one study cell (every seed at once) and measure each run's results row.

`Study` holds what all runs of a dataset share (data splits, hyperparameters, compiled
functions); `Study.train(runs)` trains the seeds of one cell together and `Study.measure` turns
a trained network and its `training.Trace` into a flat row. No measurement reads the training
batches except the three marked *training*:

    column                              how
    probe_loss_final, probe_accuracy_final
                                        the fixed held-out probe (a slice of the validation
                                        split) in evaluation mode after the last step
    probe_loss_auc                      mean probe loss over the probe points after step 0
                                        (lower = faster convergence)
    probe_oscillation                   per-point total variation of the probe loss curve
                                        beyond its net descent (0 = monotone)
    examples_to_target                  training examples seen when the probe accuracy first
                                        reaches `probe_target` (None: never)
    diverged                            1 when the final probe loss is not finite or above
                                        its value at initialization
    validation_accuracy                 the whole validation split, evaluation mode (the
                                        learning-rate sweep's criterion)
    stability_iid_{mean,var}_l{i}       variability of layer i's batch statistics over
                                        `stability_batches` uniform batches of the run's B,
                                        on the trained network in training mode, in units of
                                        the population variance (`batch_stat_variability`)
    stability_excess_{mean,var}_l{i}    the same over batches drawn by the run's sampler
                                        (random batches of one epoch) minus the i.i.d. value:
                                        what composition adds beyond the noise of B
    running_{mean,var}_bias_l{i}, running_bias
                                        `running_stat_bias` of layer i's running statistics
                                        vs the population statistics (mean and variance parts;
                                        running_bias: mean over layers of their sum); only for
                                        norms with running statistics
    accuracy_eval                       test split, evaluation mode (what serving sees)
    accuracy_batch_stats                test split, each batch of `eval_batch_size` normalized
                                        with its own statistics
    accuracy_batch_stats_train_b        the same with batches of the run's training size B
                                        (uniformly shuffled test batches)
    accuracy_gap                        accuracy_batch_stats - accuracy_eval
    silhouette, intra_inter             penultimate test features in evaluation mode
    train_loss                          *training*: mean loss of the last 10 batches
    gradient_noise, update_noise        *training*: mean (1 - cos) of consecutive gradients /
                                        weight updates

Population statistics of a layer's input: its per-channel moments over the training split (its
first `population_examples`, a random sample), computed in batches of about
`population_batch_size`, batch-statistics norms in training mode
(each layer before it then normalizes with near-population statistics, the network precise
evaluation serves), per-example norms and 'none' in evaluation mode (the same network).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from bnjax import data, lifecycle
from bnjax.core.batch_renorm import RenormSchedule
from bnjax.study import evaluation, metrics
from bnjax.study.grid import Run
from bnjax.study.training import (
    Trace,
    is_conv_call,
    make_evaluator,
    make_trainer,
    norm_inputs,
    probe_schedule,
    stack_states,
    to_trace,
)
from bnjax.train.optim import learning_rate_schedule, make_optimizer
from bnjax.train.steps import STATE_COLLECTIONS, initial_state, make_model


class Trained(NamedTuple):
    """A finished training run: final variables, what it recorded, wall time in seconds (the
    cell's time shared equally among its seeds). `Study`'s example makes real ones."""

    variables: dict
    trace: Trace
    seconds: float


class Measured(NamedTuple):
    """A run's results row, and the arrays the plots draw (per-layer population and running
    statistics, held-out features and labels). `Study`'s example makes real ones."""

    row: dict[str, Any]
    population: list[tuple[np.ndarray, np.ndarray]]  # per layer (mean, var)
    running: list[tuple[np.ndarray, np.ndarray]] | None  # per layer, None without running stats
    features: np.ndarray
    labels: np.ndarray


class RunSettings(NamedTuple):
    """What a run changes in the study's network and optimizer (`run_settings` builds one)."""

    norm: str  # the model's norm (`bnjax.models.NORMS`)
    ghost_batch_size: int | None  # capped at the run's batch size
    learning_rate: float  # the run's (chosen and scaled to its batch size)
    warmup_steps: int  # `warmup_fraction` of the run's steps
    num_steps: int
    bn_momentum: float


def run_settings(config, run: Run) -> RunSettings:
    """The run's norm, ghost batch size, learning rate, warm-up, steps and BN momentum.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> run = Run("clusters", "table", Condition("small", "uniform", 4),
      ...           normalizer("ghost_batch", 8), 0, 2400, 0.00625, 0.9)
      >>> settings = run_settings(study_config(), run)
      >>> settings.norm, settings.ghost_batch_size, settings.warmup_steps
      ('batch', 4, 240)
    """
    return RunSettings(
        norm=run.normalizer.norm,
        ghost_batch_size=run.ghost_batch_size,
        learning_rate=run.learning_rate,
        warmup_steps=round(config.warmup_fraction * run.num_steps),
        num_steps=run.num_steps,
        bn_momentum=run.bn_momentum,
    )


def renorm_schedule(config, num_steps: int) -> RenormSchedule:
    """Batch renorm's warm-up scaled to the run: the paper's shape (plain BN, then r_max 1 -> 3
    and d_max 0 -> 5) with its step counts replaced by fractions of `num_steps`.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> s = renorm_schedule(study_config(), 300)
      >>> s.warmup_steps, s.r_relax_steps, s.d_relax_steps
      (30, 150, 90)
    """
    return RenormSchedule(
        warmup_steps=round(config.renorm_warmup * num_steps),
        r_max=3.0,
        r_relax_steps=round(config.renorm_r_relax * num_steps),
        d_max=5.0,
        d_relax_steps=round(config.renorm_d_relax * num_steps),
    )


def study_model(config, settings: RunSettings, num_classes: int, *, for_training: bool):
    """The study's conv net: `models.SmallCNN` from `bnjax.train.steps.make_model`, a norm
    after each of its convs (so the normalized layers sit at several depths), with the run's
    norm options (`settings` from `run_settings`).

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> config = study_config()
      >>> settings = RunSettings("batch_renorm", None, 0.05, 30, 300, 0.9)
      >>> model = study_model(config, settings, 10, for_training=True)
      >>> model.features, model.norm, model.norm_options["schedule"].warmup_steps
      ((16, 32, 64), 'batch_renorm', 30)
    """
    renorm = {}
    if settings.norm == "batch_renorm":
        renorm = {
            "schedule": renorm_schedule(config, settings.num_steps),
            "renorm_momentum": config.renorm_momentum,
        }
    return make_model(
        "small_cnn",
        num_classes=num_classes,
        norm=settings.norm,
        norm_groups=config.norm_groups,
        bn_momentum=settings.bn_momentum,
        ghost_batch_size=settings.ghost_batch_size,
        norm_options=renorm,
        features=config.model_features,
        for_training=for_training,
    )


def study_optimizer(config, settings: RunSettings):
    """The run's optimizer: the config's, on the run's learning rate and steps.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> settings = RunSettings("batch", None, 0.05, 30, 300, 0.9)
      >>> state = study_optimizer(study_config(), settings).init({"w": jnp.ones(3)})
    """
    schedule = learning_rate_schedule(
        settings.learning_rate,
        num_steps=settings.num_steps,
        warmup_steps=settings.warmup_steps,
        schedule=config.schedule,
    )
    return make_optimizer(
        config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )


def make_batch_sampler(dataset: data.Dataset, condition, seed: int):
    """The condition's sampler over `dataset` (`bnjax.data.make_sampler`).

    Example:
      >>> from bnjax.study.grid import Condition
      >>> test = data.load("clusters", "test", config=data.ClusterConfig(test_per_class=20))
      >>> make_batch_sampler(test, Condition("s", "skewed", 20, skew=1.0), 0).epoch(0).shape
      (10, 20)
    """
    c = condition
    groups = len(dataset) if c.sampler == "uniform" else dataset.groups(c.groups)
    return data.make_sampler(
        c.sampler, groups, c.batch_size, seed=seed, skew=c.skew, shuffle_batches=c.shuffle_batches
    )


def batch_rows(dataset: data.Dataset, run: Run) -> np.ndarray:
    """(T, B) example indices of the run's training batches, epoch after epoch.

    Example:
      >>> from bnjax.study.grid import Condition, normalizer
      >>> train = data.load("clusters", "test", config=data.ClusterConfig(test_per_class=20))
      >>> run = Run("clusters", "table", Condition("skewed", "skewed", 20, skew=1.0),
      ...           normalizer("batch"), 0, 15, 0.05, 0.9)
      >>> rows = batch_rows(train, run)                  # 10 batches per epoch
      >>> rows.shape, len(set(train.labels[rows[0]].tolist()))
      ((15, 20), 1)
    """
    sampler = make_batch_sampler(dataset, run.condition, run.seed)
    epochs, total = [], 0
    while total < run.num_steps:
        epochs.append(sampler.epoch(len(epochs)))
        total += len(epochs[-1])
    return np.concatenate(epochs)[: run.num_steps].astype(np.int32)


class _Compiled(NamedTuple):
    """What runs with the same network and optimizer share."""

    model: Any  # training model (ghost batches, if any)
    eval_model: Any  # the same network without ghost batches
    trainer: Any  # make_trainer(model, eval_model, optimizer)
    evaluate: Any  # make_evaluator(eval_model)
    capture: Any  # jitted: variables, images, train -> conv outputs (norm inputs) per layer
    batch_stat_logits: Any  # jitted: variables, (K, B, ...) -> (K, B, classes), batch stats
    optimizer: Any


def _evaluation_functions(eval_model):
    """(evaluate, capture, batch_stat_logits) of `_Compiled` for an evaluation network."""

    def capture(variables, images, train):
        _, sown = eval_model.apply(
            variables,
            images,
            train=train,
            mutable=[*STATE_COLLECTIONS, "intermediates"],
            capture_intermediates=is_conv_call,
        )
        return norm_inputs(sown["intermediates"])

    def batch_stat_logits(variables, batches):
        def one(images):
            logits, _ = eval_model.apply(
                variables, images, train=True, mutable=list(STATE_COLLECTIONS)
            )
            return logits

        return jax.lax.map(one, batches)

    return (
        make_evaluator(eval_model),
        jax.jit(capture, static_argnames="train"),
        jax.jit(batch_stat_logits),
    )


def _split_batches(n: int, target: int) -> tuple[int, int]:
    """(number, size) of equal batches of about `target` covering `n` examples (the last
    n - number * size < number examples left out)."""
    number = max(1, math.ceil(n / target))
    return number, n // number


class Study:
    """Shared data splits, hyperparameters and compiled functions for the runs of one dataset.

    `train(runs)` trains runs that differ only in their seed together and returns a `Trained`
    each; `measure(run, trained)` a `Measured` whose row has the columns of the module
    docstring. Networks with the same settings share compiled functions.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> config = study_config()
      >>> config.model_features, config.eval_batch_size = (8, 16), 200
      >>> config.probe_size, config.stability_batches = 100, 4
      >>> small = data.ClusterConfig(train_per_class=40, test_per_class=20)
      >>> full = data.load("clusters", "train", config=small)
      >>> study = Study(config, full.subset(np.arange(300)), full.subset(np.arange(300, 400)),
      ...               data.load("clusters", "test", config=small))
      >>> skewed = Condition("skewed", "skewed", 16, skew=0.75)
      >>> runs = [Run("clusters", "table", skewed, normalizer("batch"), s, 20, 0.05, 0.9)
      ...         for s in (0, 1)]
      >>> trained = study.train(runs)
      >>> len(trained), trained[1].trace.loss.shape
      (2, (20,))
      >>> row = study.measure(runs[1], trained[1]).row
      >>> 0 <= row["accuracy_eval"] <= 1, row["running_bias"] >= 0, row["seed"]
      (True, True, 1)
    """

    def __init__(self, config, train: data.Dataset, validation: data.Dataset, test: data.Dataset):
        self.config = config
        self.train_set, self.validation_set, self.test_set = train, validation, test
        self._images = jax.device_put(train.images)
        self._labels = jax.device_put(train.labels)
        size = min(config.probe_size, len(validation))
        self._probe = (jax.device_put(validation.images[:size]), validation.labels[:size])
        self._compiled: dict = {}
        self._evaluation: dict = {}

    def _models(self, run: Run) -> _Compiled:
        """The run's models and jitted functions. Training functions are built per settings
        (rate, steps and momentum are compiled in); the evaluation functions once per norm,
        since evaluation does not depend on those (compiling them per run cost more than
        measuring)."""
        settings = run_settings(self.config, run)
        if settings not in self._compiled:
            num_classes = self.train_set.num_classes
            model = study_model(self.config, settings, num_classes, for_training=True)
            eval_model = study_model(self.config, settings, num_classes, for_training=False)
            optimizer = study_optimizer(self.config, settings)
            shared = self._evaluation.setdefault(settings.norm, _evaluation_functions(eval_model))
            self._compiled[settings] = _Compiled(
                model,
                eval_model,
                make_trainer(model, eval_model, optimizer),
                *shared,
                optimizer,
            )
        return self._compiled[settings]

    def train(self, runs: list[Run]) -> list[Trained]:
        """Trains `runs` (equal `group_key`, different seeds) together; one `Trained` each."""
        if len({r.group_key for r in runs}) != 1:
            raise ValueError("Study.train: the runs must differ only in their seed.")
        compiled = self._models(runs[0])
        start = time.perf_counter()
        sample = self.train_set.images[:2]
        states = stack_states(
            [initial_state(compiled.eval_model, compiled.optimizer, sample, r.seed) for r in runs]
        )
        rows = np.stack([batch_rows(self.train_set, r) for r in runs])
        probe_after = probe_schedule(runs[0].num_steps, self.config.probe_points)
        states, record, curve = compiled.trainer(
            states, self._images, self._labels, rows, self._probe, probe_after
        )
        variables = jax.device_get(
            {k: v for k, v in states.items() if k not in ("step", "opt_state")}
        )
        seconds = (time.perf_counter() - start) / len(runs)
        return [
            Trained(
                jax.tree.map(lambda a, i=i: a[i], variables),
                to_trace(record, curve, i, probe_after),
                seconds,
            )
            for i in range(len(runs))
        ]

    # ------------------------------------------------------------------ measurement

    def _uniform_batches(self, batch_size: int, seed: int):
        # One shuffled epoch; the last len % batch_size examples are left out.
        sampler = data.make_sampler("uniform", len(self.train_set), batch_size, seed=seed)
        return [self.train_set.images[r] for r in sampler.epoch(0)]

    def _population(self, run: Run, variables) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, the population (mean, var) of the norm's input (module docstring)."""
        compiled = self._models(run)
        n = min(len(self.train_set), self.config.population_examples)
        number, _ = _split_batches(n, self.config.population_batch_size)
        in_training = run.normalizer.norm in ("batch", "batch_renorm")
        # The first n examples (the split is in random order), in `number` batches whose sizes
        # differ by at most one.
        parts = np.array_split(np.arange(n), number)
        chunks = [
            compiled.capture(variables, self._images[p[0] : p[-1] + 1], in_training) for p in parts
        ]
        return [
            metrics.population_stats(np.asarray(c[i]) for c in chunks)
            for i in range(len(chunks[0]))
        ]

    def _stability(self, run: Run, variables, population) -> dict[str, float]:
        """stability_iid_* and stability_excess_* columns (module docstring)."""
        compiled = self._models(run)
        k = self.config.stability_batches
        rng = np.random.default_rng(30_000 + run.seed)
        values = {}
        for kind, condition in (("iid", run.condition.iid), ("cond", run.condition)):
            epoch = make_batch_sampler(self.train_set, condition, 30_000 + run.seed).epoch(0)
            chosen = epoch[rng.choice(len(epoch), size=min(k, len(epoch)), replace=False)]
            per_layer = [compiled.capture(variables, self._images[rows], True) for rows in chosen]
            for i, (_, var) in enumerate(population):
                x = [np.asarray(layers[i], np.float64) for layers in per_layer]
                v = metrics.batch_stat_variability(
                    np.stack([a.mean(axis=(0, 1, 2)) for a in x]),
                    np.stack([a.var(axis=(0, 1, 2)) for a in x]),
                    population_var=var,
                )
                values[(kind, "mean", i)] = v["mean_variability"]
                values[(kind, "var", i)] = v["var_variability"]
        row = {}
        for i in range(len(population)):
            for stat in ("mean", "var"):
                iid = values[("iid", stat, i)]
                row[f"stability_iid_{stat}_l{i}"] = iid
                row[f"stability_excess_{stat}_l{i}"] = values[("cond", stat, i)] - iid
        return row

    def recalibrated(self, run: Run, variables) -> dict:
        """Variables with precise running statistics: `recalibrate(mode="train")` over one
        uniformly shuffled epoch of batches of `recalibration_batch_size` (fvcore's PreciseBN)."""
        size = min(self.config.recalibration_batch_size, len(self.train_set))
        batches = self._uniform_batches(size, 20_000 + run.seed)
        return lifecycle.recalibrate(
            self._models(run).eval_model, variables, batches, apply_kwargs={"train": False}
        )

    def _evaluate_split(self, run: Run, variables, dataset: data.Dataset):
        """(running logits, batch-statistics logits, features, labels) of `dataset` in equal
        batches of about `eval_batch_size` (the last few examples left out)."""
        evaluate = self._models(run).evaluate
        number, size = _split_batches(len(dataset), self.config.eval_batch_size)
        out = [
            evaluate(variables, dataset.images[i * size : (i + 1) * size]) for i in range(number)
        ]
        running, batch, features = (np.concatenate(parts) for parts in zip(*out, strict=True))
        return running, batch, features, dataset.labels[: number * size]

    def _evaluate(self, run: Run, variables):
        """`_evaluate_split` of the test split, and the accuracy with batch statistics at the
        run's batch size."""
        compiled = self._models(run)
        running, batch, features, labels = self._evaluate_split(run, variables, self.test_set)
        b = run.condition.batch_size
        order = np.random.default_rng(40_000 + run.seed).permutation(len(self.test_set))
        order = order[: len(order) // b * b]
        logits = compiled.batch_stat_logits(
            variables, self.test_set.images[order].reshape(-1, b, *self.test_set.image_shape)
        )
        at_b = evaluation.accuracy(
            np.asarray(logits).reshape(len(order), -1).argmax(-1), self.test_set.labels[order]
        )
        return running, batch, features, labels, at_b

    def validation_accuracy(self, run: Run, variables) -> float:
        """Evaluation-mode accuracy on the whole validation split."""
        running, _, _, labels = self._evaluate_split(run, variables, self.validation_set)
        return evaluation.accuracy(running.argmax(-1), labels)

    def measure(self, run: Run, trained: Trained) -> Measured:
        """The run's results row (module docstring) and the arrays the plots need."""
        config, trace = self.config, trained.trace
        variables = trained.variables
        if run.normalizer.recalibrate:
            variables = self.recalibrated(run, variables)
        c, n = run.condition, run.normalizer
        row: dict[str, Any] = {
            "dataset": run.dataset,
            "family": run.family,
            "condition": c.name,
            "normalizer": n.name,
            "seed": run.seed,
            "batch_size": c.batch_size,
            "sampler": c.sampler,
            "groups": c.groups,
            "skew": c.skew,
            "shuffle_batches": int(c.shuffle_batches),
            "learning_rate": run.learning_rate,
            "bn_momentum": run.bn_momentum,
            "num_steps": run.num_steps,
            "examples": run.examples,
        }
        row.update(probe_columns(trace, c.batch_size, config.probe_target))
        row["validation_accuracy"] = self.validation_accuracy(run, variables)
        population = self._population(run, variables)
        row.update(self._stability(run, variables, population))
        running = None
        row["running_bias"] = None
        for i in range(len(population)):
            row[f"running_mean_bias_l{i}"] = row[f"running_var_bias_l{i}"] = None
        if n.has_running_stats:
            running = _layer_stats(variables["batch_stats"])
            biases = []
            for i, ((rm, rv), (pm, pv)) in enumerate(zip(running, population, strict=True)):
                b = metrics.running_stat_bias(rm, rv, pm, pv)
                row[f"running_mean_bias_l{i}"] = b["mean_bias"]
                row[f"running_var_bias_l{i}"] = b["scale_bias"]
                biases.append(b["bias"])
            row["running_bias"] = float(np.mean(biases))
        logits_running, logits_batch, features, labels, at_b = self._evaluate(run, variables)
        row.update(evaluation.accuracy_gap(logits_running, logits_batch, labels))
        row["accuracy_gap"] = row.pop("gap")
        row["accuracy_batch_stats_train_b"] = at_b
        row["silhouette"] = evaluation.silhouette(features, labels, seed=run.seed)
        row["intra_inter"] = evaluation.intra_inter_ratio(features, labels)["ratio"]
        row["train_loss"] = metrics.final_loss(trace.loss, k=10)
        row["gradient_noise"] = _nanmean(trace.grad_pair[1:, 0])
        row["update_noise"] = _nanmean(trace.update_pair[1:, 0])
        row["train_seconds"] = trained.seconds
        return Measured(row, population, running, features, labels)


def probe_columns(trace: Trace, batch_size: int, target: float) -> dict[str, float | None]:
    """The probe-curve columns of the module docstring from a `Trace`.

    Example:
      >>> t = Trace(np.zeros(6), np.zeros(6), (), (), np.zeros((6, 2)), np.zeros((6, 2)),
      ...           np.array([0, 2, 4, 6]), np.array([2.0, 1.0, 1.5, 0.5]),
      ...           np.array([0.1, 0.9, 0.7, 0.9]))
      >>> c = probe_columns(t, batch_size=8, target=0.8)  # first >= 0.8 after 2 steps of 8
      >>> c["examples_to_target"], c["probe_loss_auc"], c["probe_oscillation"], c["diverged"]
      (16, 1.0, 0.5, 0)
    """
    loss, accuracy = trace.probe_loss, trace.probe_accuracy
    reached = np.flatnonzero(accuracy >= target)
    final = float(loss[-1])
    return {
        "probe_loss_final": final,
        "probe_accuracy_final": float(accuracy[-1]),
        "probe_loss_auc": float(np.mean(loss[1:])),
        "probe_oscillation": metrics.loss_oscillation(loss[1:], per_step=True, excess=True)
        if len(loss) > 2
        else 0.0,
        "examples_to_target": int(trace.probe_steps[reached[0]]) * batch_size
        if reached.size
        else None,
        "diverged": int(not math.isfinite(final) or final > float(loss[0])),
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if x.size else math.nan


def _layer_stats(batch_stats) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(mean, var)] of the norm layers norm0, norm1, ... in order."""
    names = sorted(batch_stats, key=lambda n: int(n[4:]))
    return [
        (
            np.asarray(batch_stats[n]["mean"], np.float64),
            np.asarray(batch_stats[n]["var"], np.float64),
        )
        for n in names
    ]
