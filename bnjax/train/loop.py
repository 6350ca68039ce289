"""The training loop: `train_and_evaluate(config, workdir)`.

What a run does, in order:

1. checks the config (`bnjax.train.config`), loads the data, builds the batch-composition
   sampler, the model and the optimizer;
2. resumes from the newest complete checkpoint in ``workdir/checkpoints`` if there is one
   (a corrupt newest one is skipped with a warning), else initialises from `config.seed`;
3. trains for `config.num_steps` steps in the chosen parallel mode, logging metrics to
   ``workdir/metrics.jsonl`` and TensorBoard event files, evaluating on the held-out split in
   both modes (running statistics, as served; batch statistics), and checkpointing every
   `config.checkpoint_every` steps and at the end.

Determinism: the state after step s depends only on the config (the data order is a pure
function of (seed, epoch), the model has no dropout), so a run killed at any moment and
restarted with the same command ends bit-identical to an uninterrupted one on CPU (tested).
A non-finite loss stops the run with `NonFiniteLossError`; the last checkpoint, written
before, stays the last good one (the checkpointer refuses non-finite states anyway).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import jax
import numpy as np

from bnjax import data, parallel
from bnjax.train.checkpoints import Checkpointer
from bnjax.train.config import check_config
from bnjax.train.metrics import MetricWriter
from bnjax.train.optim import learning_rate_schedule, make_optimizer
from bnjax.train.steps import initial_state, make_eval_step, make_model, make_train_step


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that state."""


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


def _sampler(config, train: data.Dataset):
    groups = len(train) if config.sampler == "uniform" else train.groups(config.sampler_groups)
    return data.make_sampler(
        config.sampler, groups, config.batch_size, seed=config.seed, skew=config.skew,
        num_dominant=config.get("num_dominant", 1),
        shuffle_batches=config.get("shuffle_batches", False),
    )  # fmt: skip


def evaluate(eval_step, state, test: data.Dataset, batch_size: int, mesh=None) -> dict[str, float]:
    """Held-out accuracy with running statistics and with per-batch statistics.

    Uses the largest multiple of `batch_size` examples (so every batch has one shape and
    batch statistics never come from a single example); 'eval/examples' says how many. With a
    `mesh` (one process), each batch is split over its devices, `batch_size` rounded down to
    a multiple of their number: otherwise every device would evaluate the whole batch.
    """
    batch_size = min(batch_size, len(test))
    shard = mesh is not None and jax.process_count() == 1 and batch_size >= mesh.size
    if shard:
        batch_size = batch_size // mesh.size * mesh.size
    usable = len(test) // batch_size * batch_size
    running = batch = 0
    for start in range(0, usable, batch_size):
        rows = np.arange(start, start + batch_size)
        images, labels = test.images[rows], test.labels[rows]
        if shard:
            images, labels = parallel.shard_batch((images, labels), mesh)
        counts = eval_step(state, images, labels)
        running, batch = running + int(counts[0]), batch + int(counts[1])
    return {
        "eval/accuracy_running_stats": running / usable,
        "eval/accuracy_batch_stats": batch / usable,
        "eval/examples": usable,
    }


def _training_batches(train, sampler, start_step: int):
    """This process's batches from step `start_step` on (epoch, then offset in the epoch)."""
    epoch, offset = divmod(start_step, sampler.num_batches)
    stream = data.batches(
        train, sampler, start_epoch=epoch, num_epochs=None, process_index=None,
        process_count=None,
    )  # fmt: skip
    for batch in itertools.islice(stream, offset, None):
        yield {"image": batch["image"], "label": batch["label"]}


class _Progress:
    """A rich progress bar on an interactive terminal; silent otherwise (logs carry on)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._task = self._bar.add_task("training", total=total, completed=start)
            self._bar.start()

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=f"loss {loss:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_line(step: int, num_steps: int, scalars: dict, started: float) -> None:
    shown = " ".join(
        f"{name.split('/')[-1] if name.startswith('eval/') else name}={value:.4f}"
        for name, value in scalars.items()
        if name in ("loss", "accuracy") or name.startswith("eval/accuracy")
    )
    print(f"step {step:>6}/{num_steps}  {shown}  ({time.perf_counter() - started:.0f} s)",
          flush=True)  # fmt: skip


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
    check_config(config, _devices(config))
    train = data.load(config.dataset, "train", seed=config.seed, data_dir=config.get("data_dir"))
    test = data.load(config.dataset, "test", seed=config.seed, data_dir=config.get("data_dir"))
    sampler = _sampler(config, train)
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    mesh, axis_name = _mesh_and_axis(config)
    model = make_model(config, train.num_classes, axis_name=axis_name)
    train_step = make_train_step(model, optimizer, telemetry=config.get("telemetry", True))
    run = _runner(config, mesh, train_step)
    eval_model = make_model(config, train.num_classes, for_training=False)
    eval_step = make_eval_step(eval_model)

    state = initial_state(eval_model, optimizer, train.images[:2], config.seed)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every,
    )  # fmt: skip
    restored = checkpointer.restore_latest(target=state)
    start_step = 0 if restored is None else restored[0]
    if restored is not None:
        state = restored[1]
        print(f"resumed from {workdir}/checkpoints step {start_step}", flush=True)
    writer = MetricWriter(workdir, resume_step=start_step if restored else None)
    started = time.perf_counter()
    final: dict[str, float] = {}
    progress = _Progress(config.get("progress", True), start_step, config.num_steps)
    # Many processes: each read only its rows; jit/shard_map take the assembled global batch.
    assemble = mesh is not None and jax.process_count() > 1
    try:
        batches = _training_batches(train, sampler, start_step)
        for step in range(start_step + 1, config.num_steps + 1):
            batch = next(batches)
            if assemble:
                batch = parallel.local_batch_to_global(batch, mesh)
            state, metrics = run(state, batch)
            step_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(step_metrics["loss"]):
                raise NonFiniteLossError(
                    f"the training loss is {step_metrics['loss']} at step {step}; stopping. "
                    f"The last good checkpoint is step {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}. Lower config.learning_rate or check the data."
                )
            progress.update(step, step_metrics["loss"])
            scalars = {}
            if step % config.log_every == 0 or step == config.num_steps:
                scalars.update(step_metrics, learning_rate=float(schedule(step - 1)))
            if step % config.eval_every == 0 or step == config.num_steps:
                scalars.update(evaluate(eval_step, state, test, config.eval_batch_size, mesh))
                _print_line(step, config.num_steps, scalars | {"loss": step_metrics["loss"]},
                            started)  # fmt: skip
            final.update(scalars)
            if scalars:
                writer.write_scalars(step, scalars)
            checkpointer.save(step, state, force=step == config.num_steps)
    finally:
        progress.close()
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
    if not final:  # resumed from the last step: nothing left to train, report where it stands
        final = evaluate(eval_step, state, test, config.eval_batch_size, mesh)
        print(f"already finished: step {start_step} of {config.num_steps}", flush=True)
    sys.stdout.flush()
    return final
