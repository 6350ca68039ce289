"""The training loop: `train_and_evaluate(config, workdir)`.

What a run does, in order:

1. checks the config (`bnjax.train.config`, including evaluation batches big enough for
   batch statistics), loads the data, builds the batch-composition sampler, the model and
   the optimizer;
2. locks the workdir (`bnjax.train.workdir`: one run per workdir);
3. resumes from the newest complete checkpoint in ``workdir/checkpoints`` if there is one
   (a corrupt newest one is skipped with a warning), else initialises from `config.seed`;
   a resume whose config changes what is trained is refused (``workdir/config.json`` holds
   the config the run trained with);
4. trains for `config.num_steps` steps in the chosen parallel mode, checkpointing every
   `config.checkpoint_every` steps and at the end (before evaluating), logging metrics to
   ``workdir/metrics.jsonl`` and TensorBoard event files, and evaluating on every held-out
   example in both modes (running statistics, as served; batch statistics);
5. reads the final checkpoint back, verified: a run whose last step is not safely on disk
   raises `FinalCheckpointError` instead of reporting success.

Kills and signals: each checkpoint carries its step's training scalars, so a run killed after
a checkpoint commits but before that step's record is written gets the record on resume
(evaluation recomputed; `_complete_the_log`). The first SIGINT/SIGTERM/SIGHUP stops the run at
the next step boundary, that step saved, with `TrainingInterrupted` (`bnjax.train.interrupts`).
A workdir that cannot be written still reports a finished run, writing nothing.

Determinism: the state after step s depends only on the config (the data order is a pure
function of (seed, epoch), the model has no dropout), so a run killed at any moment and
restarted with the same command ends bit-identical to an uninterrupted one on CPU (tested).
Non-finite values stop the run with `NonFiniteError` naming the step that made them: a NaN/inf
loss, or any NaN/inf in the new parameters, statistics, optimizer state or gradient (checked
inside the step). That state is not saved; the last checkpoint stays the last good one (the
checkpointer refuses non-finite states anyway).

The host does not wait on the device every step: a step's metrics and finiteness flags stay on
the device, queued in `_PendingSteps`, and are fetched in one transfer at the next step whose
record, checkpoint or evaluation needs them (at least every `config.log_every` steps), before a
signal's save, and at the end. So the next steps are dispatched while one computes, and a
non-finite step is detected up to `config.log_every` steps after it, always before any save:
the checks of every step since the last fetch run first, and the error names the first bad
one. Batch norms whose batch statistics overflow
(a huge finite input) skip that batch's update and leave the state finite: a warning names
the step (printed when its metrics are fetched) and its record, when it has one, logs
'bn/<layer>/nonfinite'. Evaluation counts and reports the NaN/inf inputs and
outputs it meets.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import jax
import numpy as np

from bnjax import data, models, parallel
from bnjax.checkpoints import Checkpointer, CorruptCheckpointError
from bnjax.progress import Progress
from bnjax.train.averaged_model import AVERAGE, add_average, averaged_eval_state
from bnjax.train.config import check_config
from bnjax.train.interrupts import StopOnSignal, TrainingInterrupted
from bnjax.train.metrics import MetricWriter
from bnjax.train.optim import learning_rate_schedule, make_optimizer
from bnjax.train.steps import (
    FINITE_CHECK,
    checked_leaf_names,
    initial_state,
    make_eval_step,
    make_model,
    make_train_step,
    renorm_engages,
    renorm_schedule,
)
from bnjax.train.workdir import (
    CONFIG_FILE,
    WorkdirLock,
    WorkdirReadOnlyError,
    check_resume_config,
    check_workdir,
    load_config,
    save_config,
)


class NonFiniteError(RuntimeError):
    """A training step made the loss or the state NaN/inf; the run stopped without saving it.

    Raised when the step's flags are fetched: at the next step that logs, saves a checkpoint or
    evaluates (at most `config.log_every` steps later), always before any save.

    Attributes:
      step: the step that made them (the first one, when several did).
      leaves: the non-finite leaves, named as in `bnjax.train.steps.checked_leaf_names`
        ('params/conv0/kernel', 'grads/conv0/kernel', ...); empty when only the loss is.
      last_good_step: the newest checkpoint (None when none was saved yet).
    """

    def __init__(self, message: str, *, step: int, leaves=(), last_good_step=None):
        super().__init__(message)
        self.step, self.leaves, self.last_good_step = step, tuple(leaves), last_good_step


NonFiniteLossError = NonFiniteError  # the former name, from when only the loss was checked


class FinalCheckpointError(RuntimeError):
    """Training finished but its last step is not on disk and readable: not a success."""


def _devices(config) -> int:
    """Devices the global batch is split over."""
    requested = config.get("num_devices")
    if config.parallel == "pmap":
        if requested not in (None, jax.local_device_count()):
            raise ValueError(
                f"config.num_devices={requested}: config.parallel='pmap' uses all "
                f"{jax.local_device_count()} local devices; use 'jit' or 'shard_map' for fewer."
            )
        return jax.local_device_count()
    if jax.process_count() > 1 and requested not in (None, jax.device_count()):
        # Every process reads its share of each batch for its own devices, so the mesh must
        # hold every process's devices.
        raise ValueError(
            f"config.num_devices={requested}: a run of {jax.process_count()} processes uses "
            f"all {jax.device_count()} devices; leave config.num_devices unset (None)."
        )
    return jax.device_count() if requested is None else requested


def _mesh_and_axis(config):
    """(mesh or None for pmap, the axis name batch-statistics norms sync over or None)."""
    if config.parallel == "pmap":
        return None, "batch"
    mesh = parallel.data_mesh(config.get("num_devices"))
    return mesh, parallel.mesh_axes(mesh) if config.parallel == "shard_map" else None


def _runner(config, mesh, train_step):
    """run(state, batch) -> (state, metrics) in the config's parallel mode."""
    if config.parallel == "pmap":
        return parallel.pmap_step(train_step, axis_name="batch")
    if config.parallel == "shard_map":
        return parallel.shard_map_step(train_step, mesh)
    # jit: statistics over the sharded batch are global by construction (GSPMD).
    return parallel.jit_sharded_step(train_step, mesh, donate_state=True)


def _checkpointable(config, state):
    """The state as the checkpointer takes it. pmap on many processes returns arrays that live
    on one process each (the same values on all), which orbax cannot write: they go as host
    values, written once (by process 0) like any replicated value."""
    if config.parallel == "pmap" and jax.process_count() > 1:
        return parallel.to_host(state)
    return state


def model_settings(config, num_classes: int) -> dict:
    """The keywords of `bnjax.train.steps.make_model` a training config sets (all but
    `axis_name` and `for_training`, which the parallel mode and the use decide)."""
    return dict(
        name=config.model,
        num_classes=num_classes,
        norm=config.norm,
        norm_groups=config.norm_groups,
        conv=config.get("conv", "plain"),
        bn_momentum=config.bn_momentum,
        ghost_batch_size=config.get("ghost_batch_size"),
        features=config.model_features,
        zero_init_residual=config.zero_init_residual,
        mixed_precision=config.mixed_precision,
        renorm_schedule=_renorm_schedule(config),
    )


def _renorm_schedule(config):
    """Batch renorm's warm-up for the run (`bnjax.train.steps.renorm_schedule`: the config's
    step counts, the unset ones in proportion to config.num_steps); None for other norms."""
    if config.norm != "batch_renorm":
        return None
    return renorm_schedule(
        config.num_steps,
        warmup_steps=config.get("renorm_warmup_steps"),
        r_relax_steps=config.get("renorm_r_relax_steps"),
        d_relax_steps=config.get("renorm_d_relax_steps"),
    )


def _warn_if_renorm_never_engages(config) -> None:
    """One line when batch renorm stays plain batch norm for the whole run."""
    schedule = _renorm_schedule(config)
    if schedule is not None and not renorm_engages(schedule, config.num_steps):
        print(
            f"warning: batch renorm never engages in this run: its warm-up "
            f"(config.renorm_warmup_steps={schedule.warmup_steps}) lasts the whole "
            f"config.num_steps={config.num_steps}, so it trains as plain batch norm; lower "
            "config.renorm_warmup_steps (unset: num_steps // 10).",
            flush=True,
        )


def schedule_and_optimizer(config):
    """(learning-rate schedule, optax optimizer) of a training config."""
    schedule = learning_rate_schedule(
        config.learning_rate,
        num_steps=config.num_steps,
        warmup_steps=config.warmup_steps,
        schedule=config.schedule,
    )
    optimizer = make_optimizer(
        config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return schedule, optimizer


def _sampler(config, train: data.Dataset):
    groups = len(train) if config.sampler == "uniform" else train.groups(config.sampler_groups)
    return data.make_sampler(
        config.sampler,
        groups,
        config.batch_size,
        seed=config.seed,
        skew=config.skew,
        num_dominant=config.get("num_dominant", 1),
        shuffle_batches=config.get("shuffle_batches", False),
    )


def evaluation_batches(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """The held-out rows split into ceil(num_examples / batch_size) consecutive batches whose
    sizes differ by at most one (so no tiny last batch skews batch statistics).

    Example:
      >>> [len(rows) for rows in evaluation_batches(10, 4)]
      [4, 3, 3]
    """
    num_batches = max(1, math.ceil(num_examples / batch_size))
    return np.array_split(np.arange(num_examples), num_batches)


def check_evaluation_batches(config, num_test_examples: int) -> None:
    """Raises ValueError naming config.eval_batch_size when `evaluation_batches` would cut the
    held-out split into a batch too small for batch statistics.

    Run before training, so that a run cannot fail at its first evaluation.
    """
    if config.norm not in models.BATCH_STATISTICS_NORMS:
        return
    batches = evaluation_batches(num_test_examples, config.eval_batch_size)
    smallest = min(len(rows) for rows in batches)
    if smallest < 2:
        raise ValueError(
            f"config.eval_batch_size={config.eval_batch_size} cuts the {num_test_examples} "
            f"held-out examples into {len(batches)} batches, the smallest of {smallest}; batch "
            f"statistics (config.norm={config.norm!r}) need at least 2 examples per batch. "
            "Use a larger config.eval_batch_size."
        )


def evaluate(eval_step, state, test: data.Dataset, batch_size: int, mesh=None) -> dict[str, float]:
    """Held-out accuracy with running statistics and with per-batch statistics, on every example.

    The test split is cut by `evaluation_batches`; each batch is padded to one shape (at most
    `batch_size` rows, rounded up to a multiple of the mesh's devices) and the padding rows are
    masked out of the batch statistics and the counts. The numbers are therefore the same for
    any number of devices and any parallel mode; 'eval/examples' is the whole split. With a
    `mesh` (one process), each batch is split over its devices instead of being recomputed
    whole on every one.

    'eval/nonfinite_inputs' counts the held-out examples holding a NaN/inf value,
    'eval/nonfinite_outputs_running_stats' and '..._batch_stats' those whose logits are not
    finite in each evaluation (with batch statistics one bad example spoils the statistics of
    its whole batch). When any is above 0 a warning line says so.
    """
    batches = evaluation_batches(len(test), batch_size)
    shard = mesh is not None and jax.process_count() == 1
    devices = mesh.size if shard else 1
    padded = math.ceil(max(len(rows) for rows in batches) / devices) * devices
    if shard:  # a no-op for a state the step already replicated (a restored one is not)
        state = parallel.replicate(state, mesh)
    totals = np.zeros(5, np.int64)  # the fields of EvalCounts, summed over the batches
    spoiled = 0  # examples whose batch statistics include a NaN/inf input
    for rows in batches:
        images = np.zeros((padded, *test.images.shape[1:]), test.images.dtype)
        labels = np.zeros(padded, test.labels.dtype)
        valid = np.zeros(padded, bool)
        images[: len(rows)], labels[: len(rows)], valid[: len(rows)] = (
            test.images[rows],
            test.labels[rows],
            True,
        )
        inputs = (images, labels, valid)
        if shard:
            inputs = parallel.shard_batch(inputs, mesh)
        counts = np.asarray(jax.device_get(tuple(eval_step(state, *inputs))), np.int64)
        totals += counts
        spoiled += len(rows) if counts[2] else 0
    running, batch, nonfinite_inputs, nonfinite_running, nonfinite_batch = map(int, totals)
    if nonfinite_inputs or nonfinite_running or nonfinite_batch:
        print(
            f"warning: evaluation met {nonfinite_inputs} held-out example(s) with NaN/inf "
            f"values (their batches hold {spoiled} examples, whose batch statistics they "
            f"spoil) and non-finite outputs for {nonfinite_running} (running statistics) and "
            f"{nonfinite_batch} (batch statistics) of the {len(test)}; the accuracies count "
            "them as they come out.",
            flush=True,
        )
    return {
        "eval/accuracy_running_stats": running / len(test),
        "eval/accuracy_batch_stats": batch / len(test),
        "eval/examples": len(test),
        "eval/nonfinite_inputs": nonfinite_inputs,
        "eval/nonfinite_outputs_running_stats": nonfinite_running,
        "eval/nonfinite_outputs_batch_stats": nonfinite_batch,
    }


def _averaged_model_evaluation(config, eval_model, train, sampler):
    """`evaluate_average(eval_step, state, test, mesh)`: `evaluate`'s metrics of the averaged
    model ('eval/ema_accuracy_running_stats', with the statistics of config.ema_statistics;
    'eval/ema_accuracy_batch_stats'; its non-finite output counts), for a state holding one.

    'recalibrate' uses the first config.ema_recalibration_batches training batches (epoch 0,
    the sampler's order): always the same ones, so an evaluation is a pure function of the
    state, as a resumed run's rebuilt record needs.
    """
    statistics = config.get("ema_statistics", "average")
    if statistics == "recalibrate" and jax.process_count() > 1:
        raise ValueError(
            "config.ema_statistics='recalibrate' runs on one process (each process holds "
            "only its rows of the training batches); use config.ema_statistics='average'."
        )
    recalibration_batches = []

    def evaluate_average(eval_step, state, test, mesh) -> dict[str, float]:
        if statistics == "recalibrate" and not recalibration_batches:
            count = config.get("ema_recalibration_batches", 8)
            stream = _training_batches(train, sampler, 0)
            recalibration_batches.extend(b["image"] for b in itertools.islice(stream, count))
        view = averaged_eval_state(
            eval_model, state, statistics=statistics, batches=recalibration_batches
        )
        metrics = evaluate(eval_step, view, test, config.eval_batch_size, mesh)
        return {
            name.replace("eval/", "eval/ema_", 1): value
            for name, value in metrics.items()
            if name not in ("eval/examples", "eval/nonfinite_inputs")  # the same as the model's
        }

    return evaluate_average


def _training_batches(train, sampler, start_step: int):
    """This process's batches from step `start_step` on (epoch, then offset in the epoch)."""
    epoch, offset = divmod(start_step, sampler.num_batches)
    stream = data.batches(
        train,
        sampler,
        start_epoch=epoch,
        num_epochs=None,
        process_index=None,
        process_count=None,
    )
    for batch in itertools.islice(stream, offset, None):
        yield {"image": batch["image"], "label": batch["label"]}


def _stop_if_not_finite(
    step: int, loss: float, check: dict, state, checkpointer, found_at: int | None = None
) -> None:
    """Raises NonFiniteError when step `step`'s loss or its `FINITE_CHECK` flags (`check`,
    fetched) show a NaN/inf, naming the leaves, the batch's NaN/inf inputs and the last good
    checkpoint; `found_at` is the step the flags were fetched at (None: `step` itself)."""
    if not np.any(check["leaves"]) and math.isfinite(loss):
        return  # the usual case, checked without naming every leaf (a walk of the state)
    bad = [
        name for name, flag in zip(checked_leaf_names(state), check["leaves"], strict=True) if flag
    ]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        what = f"step {step} made the training state non-finite: {shown} (loss {loss:.6g})"
    else:
        what = f"the training loss is {loss} at step {step}"
    inputs = int(check["inputs"])
    cause = (
        f"its batch held {inputs} NaN/inf input value(s): check the training data"
        if inputs
        else "its batch was finite: lower config.learning_rate or look for extreme inputs"
    )
    last = checkpointer.latest_step()
    where = (
        f"the last good checkpoint is step {last} in {checkpointer.directory}"
        if last is not None
        else f"no step was saved before it in {checkpointer.directory}, so the last good "
        "checkpoint is step 0 (the initial state, which a re-run recreates from config.seed)"
    )
    found = "" if found_at in (None, step) else f" (found at step {found_at})"
    raise NonFiniteError(
        f"{what}; {cause}. Stopped{found} without saving that state; {where}.",
        step=step,
        leaves=bad,
        last_good_step=last,
    )


class _PendingSteps:
    """The metrics of the steps trained since the last fetch, still on the device.

    Fetching a step's metrics (`jax.device_get`) makes the host wait until the step is
    computed, and then the device idles while the host dispatches the next one. So the loop
    only queues each step's metrics (a few scalars and the (L,) `FINITE_CHECK` flags: small)
    and `check` fetches them all in one transfer when a step needs them on the host: its
    record, its checkpoint (a non-finite state is never saved), its evaluation, a signal's
    save, the end. Each queued step is then checked in order, as if checked at its own step:
    the first non-finite one raises NonFiniteError naming it, and the batches the batch norms
    skipped are reported with their steps.
    """

    def __init__(self):
        self._steps: list[int] = []
        self._metrics: list[dict] = []  # device arrays, one dict per step in `_steps`

    def add(self, step: int, metrics: dict) -> None:
        self._steps.append(step)
        self._metrics.append(metrics)

    def check(self, state, checkpointer, found_at: int) -> dict[str, float] | None:
        """Fetches and checks the queued steps (see the class); returns the newest one's
        scalars (without the flags), None when none was queued. `state` names the flagged
        leaves; `found_at` is the step fetching them, for the error message."""
        if not self._steps:
            return None
        steps, fetched = self._steps, jax.device_get(self._metrics)
        self._steps, self._metrics = [], []
        for step, metrics in zip(steps, fetched, strict=True):
            check = metrics.pop(FINITE_CHECK)
            step_metrics = {name: float(value) for name, value in metrics.items()}
            # Before any save: a state holding a NaN/inf is never written.
            _stop_if_not_finite(
                step, step_metrics["loss"], check, state, checkpointer, found_at=found_at
            )
            _warn_of_skipped_batches(step, step_metrics)
        return step_metrics


def _warn_of_skipped_batches(step: int, step_metrics: dict) -> None:
    """One line when batch norms skipped this step's batch ('bn/<layer>/nonfinite' > 0)."""
    layers = [
        name.removeprefix("bn/").removesuffix("/nonfinite")
        for name, value in step_metrics.items()
        if name.startswith("bn/") and name.endswith("/nonfinite") and value > 0
    ]
    if layers:
        print(
            f"warning: step {step}: the batch statistics of {', '.join(layers)} are not finite "
            "(an extreme or NaN input?); those layers left their running statistics as they "
            "were for this batch.",
            flush=True,
        )


def _print_line(step: int, num_steps: int, scalars: dict, started: float) -> None:
    shown = " ".join(
        f"{name.split('/')[-1] if name.startswith('eval/') else name}={value:.4f}"
        for name, value in scalars.items()
        if name in ("loss", "accuracy") or name.startswith(("eval/accuracy", "eval/ema_accuracy"))
    )
    print(
        f"step {step:>6}/{num_steps}  {shown}  ({time.perf_counter() - started:.0f} s)", flush=True
    )


def _resume_or_start(checkpointer, state, config, workdir: str, allow_config_change: bool):
    """(start step, state) from the newest good checkpoint, after checking the saved config;
    writes the config this run trains with to ``workdir/config.json``."""
    restored = checkpointer.restore_latest(target=state)
    start_step = 0 if restored is None else restored[0]
    if restored is not None:
        saved = load_config(workdir)
        changes = check_resume_config(saved, config, allow_changes=allow_config_change)
        state = restored[1]
        print(f"resumed from {workdir}/checkpoints step {start_step}", flush=True)
        if saved is None:
            print(
                f"note: {os.path.join(workdir, CONFIG_FILE)} is missing: this config cannot be "
                "checked against the one the run trained with",
                flush=True,
            )
        for change in changes:
            print(f"note: resuming with {change}", flush=True)
    if jax.process_index() == 0:
        save_config(config, workdir)
    return start_step, state


def _report_read_only(error, workdir, config, state, evaluate_state, allow_config_change):
    """The final metrics of a finished run in a workdir that cannot be written (nothing is
    written); re-raises `error` (WorkdirReadOnlyError) when the run has steps left to train."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise error
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        restored = checkpointer.restore_latest(target=state)
    finally:
        checkpointer.close()
    if restored is None or restored[0] != config.num_steps:
        raise error
    check_resume_config(load_config(workdir), config, allow_changes=allow_config_change)
    final = evaluate_state(restored[1])
    print(
        f"already finished: step {restored[0]} of {config.num_steps} (the workdir is "
        "read-only: nothing was written)",
        flush=True,
    )
    return final


def _due(config, step: int) -> tuple[bool, bool]:
    """(whether step's record holds the training scalars, whether it holds the evaluation)."""
    last = step == config.num_steps
    return step % config.log_every == 0 or last, step % config.eval_every == 0 or last


def _complete_the_log(writer, checkpointer, config, step: int, schedule, evaluate_state) -> dict:
    """Writes the record of the restored `step` when metrics.jsonl lacks it; returns it ({}
    when nothing was missing).

    A run is killed between saving step s and writing its record when the kill lands during
    the evaluation of s (or the write itself). The record is rebuilt as the run would have
    written it: the training scalars (loss, accuracy, telemetry, learning rate) from the
    checkpoint's manifest, where the save put them, and the evaluation recomputed from the
    restored state (a pure function of the state: the same numbers). A checkpoint written
    without scalars gives a record of the learning rate and the evaluation only.
    """
    with_training, with_evaluation = _due(config, step) if step else (False, False)
    if not (with_training or with_evaluation):
        return {}
    missing = writer.last_step != step
    if jax.process_count() > 1:  # every process evaluates (or none): process 0 decides
        from jax.experimental import multihost_utils

        missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if not missing:
        return {}
    record = {}
    if with_training:
        record.update(checkpointer.scalars(step) or {"learning_rate": float(schedule(step - 1))})
    if with_evaluation:
        record.update(evaluate_state())
    writer.write_scalars(step, record)
    print(
        f"note: wrote the record of step {step} to metrics.jsonl (the previous run stopped "
        "after saving the step, before logging it)",
        flush=True,
    )
    return record


def _stop(checkpointer, step: int, state, signal_number: int):
    """Lets the in-flight save finish, saves `step` unless it is on disk (or nothing was
    trained), then raises TrainingInterrupted."""
    checkpointer.wait_until_finished()
    if step > 0:
        checkpointer.save(step, state, force=True)
        checkpointer.wait_until_finished()
    raise TrainingInterrupted(step, signal_number)


def _check_final_checkpoint(checkpointer, num_steps: int, state) -> None:
    """Makes sure step `num_steps` is on disk and reads back verified (saving it once more if
    the copy there is corrupt); raises FinalCheckpointError when it cannot be."""
    try:
        try:
            checkpointer.verify(num_steps, target=state)
        except CorruptCheckpointError:
            # Missing or corrupt: save again (a corrupt copy is replaced), then read it back.
            checkpointer.save(num_steps, state, force=True)
            checkpointer.verify(num_steps, target=state)
    except Exception as error:  # whatever the reason, the run's result is not safely stored
        raise FinalCheckpointError(
            f"the final state (step {num_steps}) is not safely saved in "
            f"{checkpointer.directory}: {type(error).__name__}: {error}. Check the disk, then "
            "re-run the same command: it resumes from the newest good checkpoint."
        ) from error


def train_and_evaluate(
    config, workdir: str, *, allow_config_change: bool = False
) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

    Raises ValueError (a `ConfigChangedError` among them) for a config that cannot run or
    that differs from the one a resumed run trained with (unless `allow_config_change`),
    `WorkdirBusyError` when another run holds `workdir`, `NonFiniteError` when a step makes
    the loss or the state NaN/inf and `FinalCheckpointError` when the last step could not be
    saved and read back; `WorkdirError` for a workdir that cannot hold a run
    (`WorkdirReadOnlyError` when it cannot be written and the run is not finished),
    `CheckpointWriteError` (an OSError) when a checkpoint cannot be written, and
    `TrainingInterrupted` when a signal stopped it.
    """
    check_config(config, _devices(config))
    check_workdir(workdir)
    train = data.load(config.dataset, "train", seed=config.seed, data_dir=config.get("data_dir"))
    test = data.load(config.dataset, "test", seed=config.seed, data_dir=config.get("data_dir"))
    check_evaluation_batches(config, len(test))
    _warn_if_renorm_never_engages(config)
    sampler = _sampler(config, train)
    schedule, optimizer = schedule_and_optimizer(config)
    mesh, axis_name = _mesh_and_axis(config)
    model_options = model_settings(config, train.num_classes)
    model = make_model(**model_options, axis_name=axis_name)
    ema_decay = config.get("ema_decay", 0.0)
    train_step = make_train_step(
        model,
        optimizer,
        telemetry=config.get("telemetry", True),
        check_finite=True,
        ema_decay=ema_decay,
    )
    run = _runner(config, mesh, train_step)
    eval_model = make_model(**model_options, for_training=False)
    eval_step = make_eval_step(eval_model)

    state = add_average(
        initial_state(eval_model, optimizer, train.images[:2], config.seed), ema_decay
    )
    evaluate_average = _averaged_model_evaluation(config, eval_model, train, sampler)

    def evaluate_state(state) -> dict[str, float]:
        metrics = evaluate(eval_step, state, test, config.eval_batch_size, mesh)
        if AVERAGE in state:
            metrics.update(evaluate_average(eval_step, state, test, mesh))
        return metrics

    lock = WorkdirLock(workdir, jax.process_index())
    try:
        lock.acquire()
    except WorkdirReadOnlyError as error:
        return _report_read_only(
            error,
            workdir,
            config,
            state,
            evaluate_state,
            allow_config_change,
        )
    # From here on, SIGINT/SIGTERM/SIGHUP stop the run at the next step boundary, saved.
    with lock, StopOnSignal(jax.process_count() == 1) as stop:
        checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=config.keep_checkpoints,
            save_interval_steps=config.checkpoint_every,
        )
        try:
            start_step, state = _resume_or_start(
                checkpointer, state, config, workdir, allow_config_change
            )
        except BaseException:
            checkpointer.close()
            raise
        writer = MetricWriter(workdir, resume_step=start_step if start_step else None)
        started = time.perf_counter()
        final: dict[str, float] = {}
        # A bar on a terminal only: the printed evaluation lines carry on either way.
        progress = Progress(
            "training", config.num_steps, completed=start_step, enabled=config.get("progress", True)
        )
        # Many processes: each read only its rows; jit/shard_map take the assembled global batch.
        assemble = mesh is not None and jax.process_count() > 1
        try:
            rebuilt = _complete_the_log(
                writer,
                checkpointer,
                config,
                start_step,
                schedule,
                lambda: evaluate_state(state),
            )
            batches = _training_batches(train, sampler, start_step)
            pending = _PendingSteps()  # the steps whose metrics are still on the device
            shown = ""  # the progress label: the newest fetched loss
            for step in range(start_step + 1, config.num_steps + 1):
                if stop.received is not None:
                    pending.check(state, checkpointer, found_at=step - 1)  # before the save
                    _stop(checkpointer, step - 1, _checkpointable(config, state), stop.received)
                batch = next(batches)
                if assemble:
                    batch = parallel.local_batch_to_global(batch, mesh)
                state, metrics = run(state, batch)
                pending.add(step, metrics)
                last = step == config.num_steps
                with_training, with_evaluation = _due(config, step)
                save = last or checkpointer.should_save(step)
                step_metrics = None
                if with_training or with_evaluation or save:  # the host needs them: fetch
                    step_metrics = pending.check(state, checkpointer, found_at=step)
                    shown = f"loss {step_metrics['loss']:.4f}"
                progress.update(step, shown)
                # Saved before evaluating: a failing evaluation cannot cost this step's state.
                scalars = {}
                if with_training:
                    scalars.update(step_metrics, learning_rate=float(schedule(step - 1)))
                if save:  # host copies (pmap) only then
                    # The step's training scalars go into its checkpoint: a kill before its
                    # record is written costs nothing, the resumed run writes it from them.
                    checkpointer.save(
                        step, _checkpointable(config, state), force=last, scalars=scalars
                    )
                if with_evaluation:
                    scalars.update(evaluate_state(state))
                    _print_line(
                        step, config.num_steps, scalars | {"loss": step_metrics["loss"]}, started
                    )
                final.update(scalars)
                if scalars:
                    writer.write_scalars(step, scalars)
            _check_final_checkpoint(checkpointer, config.num_steps, _checkpointable(config, state))
        finally:
            progress.close()
            writer.close()
            checkpointer.close()
    if not final:  # resumed from the last step: nothing left to train, report where it stands
        final = rebuilt or evaluate_state(state)
        print(f"already finished: step {start_step} of {config.num_steps}", flush=True)
    sys.stdout.flush()
    return final
