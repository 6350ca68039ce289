"""Training metrics as JSON lines and TensorBoard event files, without TensorFlow.

Files written in `logdir` (by process 0 only when there are several processes):

- ``metrics.jsonl``: one JSON object per `write_scalars` call, one per line, e.g.
  ``{"step": 120, "time": 1718000000.25, "loss": 0.31, "accuracy": 0.9}``; ``time`` is the
  Unix wall time. Strict JSON: non-finite values are written as the strings ``"NaN"``,
  ``"Infinity"``, ``"-Infinity"`` (``float()`` parses them; `read_metrics` returns floats).
- ``events.out.tfevents.*``: the same scalars for TensorBoard (``tensorboard --logdir
  LOGDIR``), one new file per writer: TFRecord-framed ``Event`` protos, each write one event
  whose summary holds every scalar as a float32 ``simple_value`` tagged with its name. The
  records and protos are TensorBoard's own (``tensorboard.summary.writer.record_writer``,
  ``tensorboard.compat.proto``); no TensorFlow is needed.

Every write is flushed to the operating system, so a killed process loses nothing it had
written (`flush` and `close` also fsync, for power loss).

Resuming: ``MetricWriter(logdir, resume_step=s)``, with s the step of the restored checkpoint,
keeps the lines with ``step <= s`` (and drops a partial last line), then appends: the steps the
killed run logged after its checkpoint are logged again by the resumed run, once. It also marks
a restart at s + 1 in the event file, so TensorBoard drops the orphaned events with step > s.
``resume_step=None`` starts a new log: an existing ``metrics.jsonl`` is emptied. A process
killed after saving the checkpoint of step s but before writing its record leaves
`MetricWriter.last_step` below s on resume: the caller writes that record then (the training
loop rebuilds it from the checkpoint; see `bnjax.train.loop`).

    with MetricWriter(workdir, resume_step=restored_step) as writer:
        writer.write_scalars(step, {"loss": loss, "lr": lr})   # numbers or 1-element arrays
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

__all__ = ["JSONL_NAME", "MetricWriter", "read_metrics"]

JSONL_NAME = "metrics.jsonl"
_RESERVED = ("step", "time")
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _number(name: str, value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and np.size(value) == 1:
        return _number(name, np.asarray(value).reshape(()).item())
    raise TypeError(
        f"metric {name!r}: expected a number or a one-element array, got {type(value).__name__}"
        + (f" of shape {np.shape(value)}" if hasattr(value, "shape") else "")
    )


def _json_value(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _line_step(line: str) -> int | None:
    """The step of a complete JSONL line, None for a partial or unreadable one."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _keep_through(path: str, last_step: int | None) -> int | None:
    """Rewrites `path` (atomically) without the lines after `last_step` (all when None);
    returns the step of the last line kept (None when none is)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        lines = file.readlines()
    kept = [
        line
        for line in lines
        if last_step is not None and (step := _line_step(line)) is not None and step <= last_step
    ]
    last_kept = _line_step(kept[-1]) if kept else None
    if len(kept) == len(lines):
        return last_kept
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.writelines(kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return last_kept


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of `path`/metrics.jsonl for a directory).

    Non-finite values come back as floats; a partial last line is skipped.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     writer = MetricWriter(workdir, tensorboard=False)
      ...     writer.write_scalars(10, {"loss": 0.5})
      ...     writer.write_scalars(20, {"loss": float("nan")})     # stored as "NaN"
      ...     writer.close()
      ...     records = read_metrics(workdir)
      >>> [(record["step"], record["loss"]) for record in records]
      [(10, 0.5), (20, nan)]
    """
    if os.path.isdir(path):
        path = os.path.join(path, JSONL_NAME)
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            if _line_step(line) is None:
                continue
            record = json.loads(line)
            records.append(
                {
                    key: _NON_FINITE.get(value, value) if isinstance(value, str) else value
                    for key, value in record.items()
                }
            )
    return records


class _EventFile:
    """A new ``events.out.tfevents.*`` file in `logdir`, written synchronously.

    Not tensorboard's ``EventFileWriter``: that one writes from a background queue (a killed
    process loses what is queued) and names files by the second, then host and pid, so two
    runs started within one second may sort out of order. TensorBoard reads a directory's
    files in name order, and dropping the orphaned events of a killed run relies on reading
    the resumed run's file after the killed one's: here names sort by creation time to the
    nanosecond.
    """

    _last_ns = 0

    def __init__(self, logdir: str):
        now = _EventFile._last_ns = max(time.time_ns(), _EventFile._last_ns + 1)
        name = (
            f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}"
            f".{socket.gethostname()}.{os.getpid()}.v2"
        )
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()  # to the OS: a killed process loses nothing written

    def write_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float) -> None:
        """One event holding every scalar (a float32 ``simple_value``) at `step`."""
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        summary = summary_pb2.Summary(value=values)
        self._write(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def write_session_start(self, step: int) -> None:
        """Marks a (re)start at `step`: TensorBoard drops the earlier events with step >= it."""
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._write(event_pb2.Event(wall_time=time.time(), step=step, session_log=start))

    def flush(self) -> None:
        self._records.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._records.closed:
            self.flush()
            self._records.close()


class MetricWriter:
    """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard event files in `logdir`.

    Args:
      logdir: the directory (created if needed), typically the run's ``--workdir``.
      resume_step: the step of the checkpoint the run resumed from, or None for a new run;
        see the module docstring.
      tensorboard: also write TensorBoard event files.
      active: whether this process writes; default ``jax.process_index() == 0``. An inactive
        writer creates no file and ignores every call.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     writer = MetricWriter(workdir, tensorboard=False)
      ...     writer.write_scalars(10, {"loss": 0.5, "accuracy": np.float32(0.75)})
      ...     writer.close()
      ...     sorted(os.listdir(workdir))
      ['metrics.jsonl']
    """

    def __init__(
        self,
        logdir: str,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        active: bool | None = None,
    ):
        if active is None:
            import jax

            active = jax.process_index() == 0
        self.logdir = os.fspath(logdir)
        self.active = active
        self.jsonl_path = os.path.join(self.logdir, JSONL_NAME)
        self._jsonl = self._events = None
        # The step of the newest record on file: after a resume from step s, s itself when
        # its record was written, older when the process died between the save and the write.
        self.last_step: int | None = None
        if not active:
            return
        os.makedirs(self.logdir, exist_ok=True)
        self.last_step = _keep_through(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            self._events = _EventFile(self.logdir)
            self._events.write_session_start(0 if resume_step is None else resume_step + 1)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends one record: `scalars` ({name: number or one-element array}) at `step`.

        Raises ValueError for a reserved name ('step', 'time') and TypeError for a value that
        is not a single number, naming the metric; OSError naming the step and the directory
        when the files cannot be written (a full disk).
        """
        values = {}
        for name, value in scalars.items():
            if not isinstance(name, str) or not name or name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved or not a non-empty string")
            values[name] = _number(name, value)
        if not self.active:
            return
        if self._jsonl is None:
            raise ValueError("MetricWriter is closed")
        wall_time = time.time()
        record = {"step": int(step), "time": wall_time}
        record.update((name, _json_value(value)) for name, value in values.items())
        try:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
            self.last_step = int(step)
            if self._events is not None:
                self._events.write_scalars(int(step), values, wall_time=wall_time)
        except OSError as error:  # a full disk: say which file, and that nothing is lost
            raise OSError(
                error.errno,
                f"{error.strerror}: cannot write the metrics of step {step} in {self.logdir}; "
                "a resumed run writes them again (free space, then re-run the same command)",
            ) from error

    def flush(self) -> None:
        """Flushes and fsyncs both files."""
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self.flush()
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
