"""Train one run of the study and measure every column of its results row.

`Study` holds what all runs share (data, hyperparameters, compiled functions); `Study.train`
trains a `grid.Run` and `Study.measure` turns the trained network and its `training.Trace` into
a flat row of numbers:

    column                          how
    stability_mean_l{i}, _var_l{i}  `batch_stat_variability` of layer i's norm inputs over the
                                    last `stability_window` of the steps, in units of the
                                    population variance (variance method)
    final_loss                      mean training loss over the last 10 steps
    loss_oscillation                per-step total variation of the loss curve beyond its net
                                    descent (`loss_oscillation(per_step=True, excess=True)`)
    steps_to_target                 first step whose 10-step mean loss <= `loss_target`
    gradient_noise, update_noise    mean (1 - cos) of consecutive gradients / weight updates
    running_bias_l{i}, running_bias `running_stat_bias` of layer i's running statistics vs the
                                    exact population statistics (and the mean over layers);
                                    only for norms with running statistics
    accuracy_eval, accuracy_batch_stats, accuracy_gap
                                    held-out accuracy with running statistics, with each
                                    evaluation batch's own statistics, and batch - eval
    silhouette, intra_inter         penultimate features of the held-out set in evaluation mode

Population statistics of a layer's input: for batch-statistics norms, what
`lifecycle.recalibrate(mode="full_batch")` computes over the whole training set (each layer's
input when every layer before it normalizes with the population statistics, i.e. the network
that precise evaluation would serve); for per-example norms, `population_stats` of the conv
outputs in evaluation mode (the same network in both modes).
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
    to_trace,
)
from bnjax.train.optim import learning_rate_schedule, make_optimizer
from bnjax.train.steps import initial_state, make_model


class Trained(NamedTuple):
    """A finished training run: final variables, what it recorded, wall time in seconds.

    Example (a real one: `Study`):
      >>> Trained(variables={}, trace=None, seconds=1.5).seconds
      1.5
    """

    variables: dict
    trace: Trace
    seconds: float


class Measured(NamedTuple):
    """A run's results row, and the arrays the plots draw (per-layer population statistics,
    held-out features and labels).

    Example (a real one: `Study`):
      >>> m = Measured({"accuracy_eval": 1.0}, [], None, np.zeros((4, 8)), np.arange(4))
      >>> m.row["accuracy_eval"], m.features.shape
      (1.0, (4, 8))
    """

    row: dict[str, Any]
    population: list[tuple[np.ndarray, np.ndarray]]  # per layer (mean, var)
    running: list[tuple[np.ndarray, np.ndarray]] | None  # per layer, None without running stats
    features: np.ndarray
    labels: np.ndarray


class RunSettings(NamedTuple):
    """What a run changes in the study's network and optimizer (`run_settings` builds one).

    Example:
      >>> RunSettings("batch", None, 0.05, 30, 300).learning_rate
      0.05
    """

    norm: str  # the model's norm (`bnjax.models.NORMS`)
    ghost_batch_size: int | None  # capped at the run's batch size
    learning_rate: float  # the config's, times the run's `lr_scale`
    warmup_steps: int  # the config's, in proportion to the run's steps
    num_steps: int


def run_settings(config, run: Run) -> RunSettings:
    """The run's norm, ghost batch size (capped at the run's batch size), learning rate and
    steps (warm-up in proportion: the same fraction of the run).

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> run = Run(Condition("small", "uniform", 4), normalizer("ghost_batch", 8), seed=0)
      >>> settings = run_settings(study_config(), run)
      >>> settings.norm, settings.ghost_batch_size, settings.learning_rate
      ('batch', 4, 0.05)
    """
    steps = run_steps(config, run)
    return RunSettings(
        norm=run.normalizer.norm,
        ghost_batch_size=run.ghost_batch_size,
        learning_rate=config.learning_rate * run.lr_scale,
        warmup_steps=round(config.warmup_steps * steps / config.num_steps),
        num_steps=steps,
    )


def run_steps(config, run: Run) -> int:
    """The run's training steps: its own `num_steps`, else the config's.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> uniform, batch = Condition("u", "uniform", 2), normalizer("batch")
      >>> run_steps(study_config(), Run(uniform, batch, 0)), run_steps(
      ...     study_config(), Run(uniform, batch, 0, num_steps=4800))
      (300, 4800)
    """
    return config.num_steps if run.num_steps is None else run.num_steps


def renorm_schedule(config, num_steps: int | None = None) -> RenormSchedule:
    """Batch renorm's warm-up scaled to the run: the paper's shape (plain BN, then r_max 1 -> 3
    and d_max 0 -> 5) with its step counts replaced by fractions of `num_steps`.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> s = renorm_schedule(study_config())          # 300 steps
      >>> s.warmup_steps, s.r_relax_steps, s.d_relax_steps
      (30, 150, 90)
    """
    steps = config.num_steps if num_steps is None else num_steps
    return RenormSchedule(
        warmup_steps=round(config.renorm_warmup * steps),
        r_max=3.0,
        r_relax_steps=round(config.renorm_r_relax * steps),
        d_max=5.0,
        d_relax_steps=round(config.renorm_d_relax * steps),
    )


def study_model(config, settings: RunSettings, num_classes: int, *, for_training: bool):
    """The study's conv net: `models.SmallCNN` from `bnjax.train.steps.make_model`, a norm
    after each of its convs (so the normalized layers sit at several depths), with the run's
    norm options (`settings` from `run_settings`).

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> config = study_config()
      >>> run = Run(Condition("u", "uniform", 32), normalizer("batch_renorm"), seed=0)
      >>> model = study_model(config, run_settings(config, run), 10, for_training=True)
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
        bn_momentum=config.bn_momentum,
        ghost_batch_size=settings.ghost_batch_size,
        norm_options=renorm,
        features=config.model_features,
        for_training=for_training,
    )


def study_optimizer(config, settings: RunSettings):
    """The run's optimizer: the config's, on the run's learning rate and steps.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> optimizer = study_optimizer(study_config(), RunSettings("batch", None, 0.05, 30, 300))
      >>> state = optimizer.init({"w": jnp.ones(3)})          # an optax GradientTransformation
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


def batch_rows(dataset: data.Dataset, run: Run, num_steps: int) -> np.ndarray:
    """(T, B) example indices of the run's training batches, epoch after epoch.

    Example:
      >>> from bnjax.study.grid import Condition, normalizer
      >>> train = data.load("clusters", "test", config=data.ClusterConfig(test_per_class=20))
      >>> run = Run(Condition("skewed", "skewed", 20, skew=1.0), normalizer("batch"), seed=0)
      >>> rows = batch_rows(train, run, 15)                  # 10 batches per epoch
      >>> rows.shape, len(set(train.labels[rows[0]].tolist()))
      ((15, 20), 1)
    """
    c = run.condition
    groups = len(dataset) if c.sampler == "uniform" else dataset.groups(c.groups)
    sampler = data.make_sampler(
        c.sampler,
        groups,
        c.batch_size,
        seed=run.seed,
        skew=c.skew,
        shuffle_batches=c.shuffle_batches,
    )
    epochs, total = [], 0
    while total < num_steps:
        epochs.append(sampler.epoch(len(epochs)))
        total += len(epochs[-1])
    return np.concatenate(epochs)[:num_steps].astype(np.int32)


class _Compiled(NamedTuple):
    """What runs with the same norm, ghost size, steps and learning rate share."""

    model: Any  # training model (ghost batches, if any)
    eval_model: Any  # the same network without ghost batches
    trainer: Any  # make_trainer(model, optimizer)
    evaluate: Any  # make_evaluator(eval_model)
    capture: Any  # jitted: variables, images -> eval-mode conv outputs ('intermediates')
    optimizer: Any


class Study:
    """Shared data, hyperparameters and compiled functions for all runs of one study config.

    `train(run)` returns a `Trained`, `measure(run, trained)` a `Measured` whose row has the
    columns of the module docstring. Networks with the same norm share compiled functions.

    Example:
      >>> from bnjax.study.defaults import study_config
      >>> from bnjax.study.grid import Condition, normalizer
      >>> config = study_config()
      >>> config.num_steps, config.warmup_steps = 20, 4
      >>> config.model_features, config.eval_batch_size = (8, 16), 200
      >>> small = data.ClusterConfig(train_per_class=40, test_per_class=20)
      >>> study = Study(config, data.load("clusters", "train", config=small),
      ...               data.load("clusters", "test", config=small))
      >>> run = Run(Condition("skewed", "skewed", 16, skew=0.75), normalizer("batch"), seed=0)
      >>> trained = study.train(run)
      >>> trained.trace.loss.shape
      (20,)
      >>> row = study.measure(run, trained).row
      >>> 0 <= row["accuracy_eval"] <= 1, row["running_bias"] >= 0, "stability_mean_l1" in row
      (True, True, True)
    """

    def __init__(self, config, train: data.Dataset, test: data.Dataset):
        self.config = config
        self.train_set, self.test_set = train, test
        self._images = jax.device_put(train.images)
        self._labels = jax.device_put(train.labels)
        self._compiled: dict = {}

    def _models(self, run: Run) -> _Compiled:
        """The run's models and jitted functions, built once per norm, ghost size, steps and
        learning rate and reused (so each compiles once per shape)."""
        settings = run_settings(self.config, run)
        key = (settings.norm, settings.ghost_batch_size, settings.num_steps, settings.learning_rate)
        if key not in self._compiled:
            num_classes = self.train_set.num_classes
            model = study_model(self.config, settings, num_classes, for_training=True)
            eval_model = study_model(self.config, settings, num_classes, for_training=False)
            optimizer = study_optimizer(self.config, settings)

            def capture(variables, images):
                _, sown = eval_model.apply(
                    variables,
                    images,
                    train=False,
                    mutable=["intermediates"],
                    capture_intermediates=is_conv_call,
                )
                return sown

            self._compiled[key] = _Compiled(
                model,
                eval_model,
                make_trainer(model, optimizer),
                make_evaluator(eval_model),
                jax.jit(capture),
                optimizer,
            )
        return self._compiled[key]

    def train(self, run: Run) -> Trained:
        """Trains `run` from its seed; returns the final variables and the per-step trace."""
        compiled = self._models(run)
        start = time.perf_counter()
        state = initial_state(
            compiled.eval_model, compiled.optimizer, self.train_set.images[:2], run.seed
        )
        rows = batch_rows(self.train_set, run, run_steps(self.config, run))
        state, record = compiled.trainer(state, self._images, self._labels, rows)
        trace = to_trace(record)
        variables = {k: v for k, v in state.items() if k not in ("step", "opt_state")}
        return Trained(jax.device_get(variables), trace, time.perf_counter() - start)

    # ------------------------------------------------------------------ measurement

    def _uniform_batches(self, batch_size: int, seed: int):
        # One shuffled epoch; the last len % batch_size examples are left out (none by default).
        sampler = data.make_sampler("uniform", len(self.train_set), batch_size, seed=seed)
        return [self.train_set.images[r] for r in sampler.epoch(0)]

    def _population(self, run: Run, variables) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer, the exact population (mean, var) of the norm's input (module docstring)."""
        compiled = self._models(run)
        batches = self._uniform_batches(self.config.eval_batch_size, seed=10_000 + run.seed)
        if run.normalizer.has_running_stats:
            full = lifecycle.recalibrate(
                compiled.eval_model,
                variables,
                batches,
                mode="full_batch",
                apply_kwargs={"train": False},
            )
            return _layer_stats(full["batch_stats"])
        chunks = [norm_inputs(compiled.capture(variables, b)["intermediates"]) for b in batches]
        return [metrics.population_stats(c[i] for c in chunks) for i in range(len(chunks[0]))]

    def recalibrated(self, run: Run, variables) -> dict:
        """Variables with precise running statistics: `recalibrate(mode="train")` over one
        uniformly shuffled epoch of batches of `recalibration_batch_size` (fvcore's PreciseBN)."""
        batches = self._uniform_batches(self.config.recalibration_batch_size, 20_000 + run.seed)
        return lifecycle.recalibrate(
            self._models(run).eval_model, variables, batches, apply_kwargs={"train": False}
        )

    def _evaluate(self, run: Run, variables):
        evaluate = self._models(run).evaluate
        size = min(self.config.eval_batch_size, len(self.test_set))
        usable = len(self.test_set) // size * size
        out = [
            evaluate(variables, self.test_set.images[i : i + size]) for i in range(0, usable, size)
        ]
        running, batch, features = (np.concatenate(parts) for parts in zip(*out, strict=True))
        return running, batch, features, self.test_set.labels[:usable]

    def measure(self, run: Run, trained: Trained) -> Measured:
        """The run's results row (module docstring) and the arrays the plots need."""
        config, trace = self.config, trained.trace
        variables = trained.variables
        if run.normalizer.recalibrate:
            variables = self.recalibrated(run, variables)
        population = self._population(run, variables)
        c, n = run.condition, run.normalizer
        row: dict[str, Any] = {
            "study": run.study,
            "condition": c.name,
            "normalizer": n.name,
            "seed": run.seed,
            "batch_size": c.batch_size,
            "sampler": c.sampler,
            "groups": c.groups,
            "skew": c.skew,
        }
        window = max(2, round(config.stability_window * len(trace.loss)))
        for i, (_, var) in enumerate(population):
            v = metrics.batch_stat_variability(
                trace.batch_means[i][-window:], trace.batch_vars[i][-window:], population_var=var
            )
            row[f"stability_mean_l{i}"] = v["mean_variability"]
            row[f"stability_var_l{i}"] = v["var_variability"]
        row["final_loss"] = metrics.final_loss(trace.loss, k=10)
        row["loss_oscillation"] = metrics.loss_oscillation(trace.loss, per_step=True, excess=True)
        row["steps_to_target"] = metrics.steps_to_target(
            trace.loss, config.loss_target, window=10, steps=np.arange(1, len(trace.loss) + 1)
        )
        row["gradient_noise"] = _nanmean(trace.grad_pair[1:, 0])
        row["update_noise"] = _nanmean(trace.update_pair[1:, 0])
        running = None
        row.update({f"running_bias_l{i}": None for i in range(len(population))}, running_bias=None)
        if n.has_running_stats:
            running = _layer_stats(variables["batch_stats"])
            biases = [
                metrics.running_stat_bias(rm, rv, pm, pv)["bias"]
                for (rm, rv), (pm, pv) in zip(running, population, strict=True)
            ]
            row.update({f"running_bias_l{i}": b for i, b in enumerate(biases)})
            row["running_bias"] = float(np.mean(biases))
        logits_running, logits_batch, features, labels = self._evaluate(run, variables)
        row.update(evaluation.accuracy_gap(logits_running, logits_batch, labels))
        row["accuracy_gap"] = row.pop("gap")
        row["train_accuracy"] = float(np.mean(trace.accuracy[-10:]))
        row["silhouette"] = evaluation.silhouette(features, labels, seed=run.seed)
        row["intra_inter"] = evaluation.intra_inter_ratio(features, labels)["ratio"]
        row["train_seconds"] = trained.seconds
        return Measured(row, population, running, features, labels)


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
