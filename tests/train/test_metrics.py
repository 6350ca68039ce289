"""MetricWriter: JSON lines, event files, resume without duplicates, TensorBoard reading."""

import glob
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2

from bnjax.train import MetricWriter, read_metrics

SESSION_START = event_pb2.SessionLog.START


def read_events(path):
    """The events of one event file as dicts, read by TensorBoard's own loader."""
    for record in event_file_loader.RawEventFileLoader(path).Load():
        event = event_pb2.Event.FromString(record)
        yield {
            "step": event.step,
            "wall_time": event.wall_time,
            "scalars": {value.tag: value.simple_value for value in event.summary.value},
            "session_log_status": event.session_log.status,
        }


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _event_files(logdir):
    return sorted(glob.glob(str(logdir / "events.out.tfevents.*")))


def test_jsonl_records_and_types(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"loss": jnp.float32(0.5), "acc": np.array([0.25]), "n": 3})
        writer.write_scalars(2, {"loss": math.nan, "up": math.inf, "down": -np.inf, "ok": True})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (_strict(line) for line in lines)  # strict JSON, even with NaN
    assert first["step"] == 1 and first["time"] > 1e9
    assert (first["loss"], first["acc"], first["n"]) == (0.5, 0.25, 3)
    assert second["loss"] == "NaN" and second["up"] == "Infinity" and second["ok"] == 1
    records = read_metrics(str(tmp_path))
    assert math.isnan(records[1]["loss"]) and records[1]["down"] == -math.inf


def test_each_write_reaches_the_file_before_close(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(5, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [5]  # not closed: flushed
    events = list(read_events(_event_files(tmp_path)[0]))
    assert events[-1]["scalars"] == {"loss": 1.0}
    writer.close()


def test_resume_drops_later_steps_and_partial_line(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        for step in range(10):
            writer.write_scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 10, "ti')  # killed mid-write
    with MetricWriter(str(tmp_path), resume_step=5) as writer:
        for step in range(6, 8):
            writer.write_scalars(step, {"loss": 100.0 + step})
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(8))
    assert [r["loss"] for r in records[5:]] == [5.0, 106.0, 107.0]
    second_file = _event_files(tmp_path)[-1]
    events = list(read_events(second_file))
    assert events[1]["session_log_status"] == SESSION_START and events[1]["step"] == 6


def test_new_run_empties_the_log(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(0, {"loss": 1.0})
    with MetricWriter(str(tmp_path), resume_step=None) as writer:
        writer.write_scalars(0, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(str(tmp_path))] == [2.0]


def test_bad_metrics_are_named(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError, match=r"'grads'.*shape \(3,\)"):
            writer.write_scalars(0, {"grads": np.ones(3)})
        with pytest.raises(TypeError, match="'name'"):
            writer.write_scalars(0, {"name": "resnet"})
        with pytest.raises(ValueError, match="'step'"):
            writer.write_scalars(0, {"step": 1})
    with pytest.raises(ValueError, match="closed"):
        writer.write_scalars(0, {"loss": 1.0})


def test_inactive_process_writes_nothing(tmp_path):
    with MetricWriter(str(tmp_path / "run"), active=False) as writer:
        writer.write_scalars(0, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_tensorboard_reads_scalars_and_purges_orphans(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricWriter(str(tmp_path)) as writer:  # the killed run got to step 9
        for step in range(10):
            writer.write_scalars(step, {"loss": float(step)})
    with MetricWriter(str(tmp_path), resume_step=5) as writer:  # resumed from checkpoint 5
        for step in range(6, 12):
            writer.write_scalars(step, {"loss": 100.0 + step, "lr": 0.5})
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr"}
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 12)]
