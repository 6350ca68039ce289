"""scripts/train.py on many hosts, end to end: two processes on 127.0.0.1 with two CPU devices
each (one workdir shared, as on a shared file system) train, log, evaluate and checkpoint the
same run as one process with four devices, in every parallel mode; killed mid-run and
restarted, they end where the uninterrupted run ends; and recalibrating the trained model's
statistics on batches sharded over both processes gives one process's statistics.

Each multi-process run takes 30-60 s on a 2-core machine: only the first test runs by default,
the others are marked slow (`pytest -m slow tests/train/test_multihost_train.py`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from bnjax.train import loop, read_metrics
from tests import multihost
from tests.train import multihost_recalibrate_worker as worker

TIMEOUT = 240  # seconds for one multi-process run, start-up included
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
MODE_TOLERANCE = {"atol": 2e-4, "rtol": 2e-4}  # another parallel mode: other rounding


def train_command(workdir, **settings) -> list[str]:
    """The command every process runs (the distributed set-up comes from the environment)."""
    settings = worker.SETTINGS | settings
    return [
        sys.executable,
        str(multihost.ROOT / "scripts" / "train.py"),
        f"--config={multihost.ROOT / 'configs' / 'default.py'}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in settings.items()),
    ]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The workdir of an uninterrupted run of 2 processes x 2 devices."""
    multihost.skip_if_disabled()
    workdir = tmp_path_factory.mktemp("two_processes")
    # The coordinator flags here (the environment in the other runs): both ways must work.
    multihost.run(train_command(workdir / "run"), workdir, timeout=TIMEOUT, flags=True)
    return workdir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The workdir of the same run in one process on 4 of its devices."""
    workdir = tmp_path_factory.mktemp("one_process") / "run"
    loop.train_and_evaluate(worker.config(num_devices=4), str(workdir))
    return workdir


def _without_time(records):
    return [{k: v for k, v in record.items() if k != "time"} for record in records]


def test_two_processes_train_and_evaluate_like_one(two_processes, one_process):
    workdir = two_processes / "run"
    records, expected = (_without_time(read_metrics(str(w))) for w in (workdir, one_process))
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert [sorted(r) for r in records] == [sorted(r) for r in expected]
    chex.assert_trees_all_close(records, expected, **TOLERANCE)
    for record, reference in zip(records, expected, strict=True):  # counts: exactly equal
        evaluation = {k: v for k, v in record.items() if k.startswith("eval/")}
        assert evaluation == {k: reference[k] for k in evaluation}
    assert records[-1]["eval/examples"] == 2000

    step, state = worker.final_state(workdir)
    reference_step, reference = worker.final_state(one_process)
    assert step == reference_step == worker.SETTINGS["num_steps"]
    assert set(state) >= {"params", "batch_stats", "opt_state"}
    chex.assert_trees_all_close(state, reference, **TOLERANCE)

    # One run's files: process 0 writes the metrics, config and events; each process locks.
    names = sorted(os.listdir(workdir))
    assert [n for n in names if n.startswith("events.out.tfevents")].__len__() == 1
    assert {".lock", ".lock.process1", "config.json", "metrics.jsonl", "checkpoints"} <= set(names)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6", "9"]
    for process_id in range(2):
        log = multihost.log_path(two_processes, "process", process_id).read_text()
        assert "final: " in log, log[-2000:]


def test_many_processes_use_every_device(monkeypatch, tmp_path):
    """A mesh without some process's devices cannot take that process's rows: refused before
    anything is loaded or written, naming the key."""
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"config.num_devices=2: a run of 2 processes"):
        loop.train_and_evaluate(worker.config(num_devices=2), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_processes_resume_to_the_uninterrupted_state(two_processes, tmp_path):
    """SIGKILL of one process once the first checkpoint is committed (the other one is killed
    right after, as a job scheduler does); both restart with the same command."""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    command = train_command(workdir)
    processes = multihost.start(command, tmp_path, name="killed")
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (checkpoints / "3").is_dir():
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                break
            time.sleep(0.02)
        still_running = processes[1].poll() is None
        processes[1].kill()
        processes[1].wait(timeout=30)
        try:  # the survivor waits for its peer in a collective: stop it, as a scheduler does
            processes[0].wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    finally:
        multihost.stop(processes)
    assert still_running, (
        "process 1 ended before it could be killed:\n"
        + (multihost.log_path(tmp_path, "killed", 1).read_text()[-3000:])
    )
    assert sorted(os.listdir(checkpoints))[0] == "3"
    assert "12" not in os.listdir(checkpoints), "the killed run already finished"

    multihost.run(command, tmp_path, name="resumed", timeout=TIMEOUT)
    for process_id in range(2):
        log = multihost.log_path(tmp_path, "resumed", process_id).read_text()
        assert "resumed from" in log, log[-2000:]

    step, state = worker.final_state(workdir)
    expected_step, expected = worker.final_state(two_processes / "run")
    assert step == expected_step == worker.SETTINGS["num_steps"]
    chex.assert_trees_all_equal(state, expected)
    records = _without_time(read_metrics(str(workdir)))
    expected_records = _without_time(read_metrics(str(two_processes / "run")))
    assert [r["step"] for r in records] == [3, 6, 9, 12]  # each step logged once
    chex.assert_trees_all_equal(records, expected_records)
    assert np.isfinite(records[-1]["loss"])


def _mode_run(tmp_path, mode):
    multihost.skip_if_disabled()
    multihost.run(train_command(tmp_path / "run", parallel=mode), tmp_path, timeout=TIMEOUT)
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_two_processes_in_other_parallel_modes(tmp_path, mode, one_process):
    """shard_map over the global mesh; pmap over each process's devices, collectives across
    both (its per-process state is checkpointed as host values)."""
    workdir = _mode_run(tmp_path, mode)
    records, expected = (_without_time(read_metrics(str(w))) for w in (workdir, one_process))
    # The per-layer BN telemetry ("bn/...") is logged in jit mode only.
    expected = [{k: v for k, v in r.items() if not k.startswith("bn/")} for r in expected]
    chex.assert_trees_all_close(records, expected, **MODE_TOLERANCE)
    step, state = worker.final_state(workdir)
    _, reference = worker.final_state(one_process)
    assert step == worker.SETTINGS["num_steps"]
    chex.assert_trees_all_close(state, reference, **MODE_TOLERANCE)


@pytest.mark.slow
def test_recalibration_over_two_processes_equals_one_process(two_processes, tmp_path):
    """`bnjax.lifecycle.recalibrate` under jit on global batches that each process assembles
    from its own rows (tests/train/multihost_recalibrate_worker.py) gives the statistics of
    one device recalibrating on the whole batches."""
    workdir = two_processes / "run"
    command = [sys.executable, "-m", "tests.train.multihost_recalibrate_worker"]
    multihost.run([*command, str(workdir), str(tmp_path)], tmp_path, timeout=TIMEOUT)

    _, state = worker.final_state(workdir)
    expected = worker.flatten(worker.recalibrated(state, list(worker.recalibration_images())))
    trained = worker.flatten(state["batch_stats"])
    for process_id in range(2):
        with np.load(tmp_path / f"process{process_id}.npz") as saved:
            got = {key: saved[key] for key in saved.files}
        assert sorted(got) == sorted(expected)
        chex.assert_trees_all_close(got, expected, **TOLERANCE)
    assert not np.allclose(expected["['norm0']['mean']"], trained["['norm0']['mean']"])


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX derives it: 61440 + id % 4096) is free now."""
    for port in range(61440 + os.getpid() % 4096, 65536):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port - 61440
    pytest.skip("no free port in JAX's Slurm coordinator range")


@pytest.mark.slow
def test_slurm_launch_with_auto_detection(two_processes, tmp_path):
    """`--distributed_auto_detect` under `srun` (its variables imitated: two tasks on one
    node): JAX finds the coordinator, the process count and index; the run is the same."""
    multihost.skip_if_disabled()
    env = multihost.environment(1, 2)  # no JAX_* variables: Slurm's stand in for them
    slurm = dict(
        SLURM_JOB_ID=str(_slurm_job_id()),
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_NTASKS="2",
        SLURM_STEP_NUM_NODES="1",
    )
    command = [*train_command(tmp_path / "run"), "--distributed_auto_detect"]
    launches = [
        (command, dict(env, **slurm, SLURM_PROCID=str(task), SLURM_LOCALID=str(task)))
        for task in range(2)
    ]
    processes = multihost.start_each(launches, tmp_path, name="task")
    multihost.wait(processes, TIMEOUT)
    multihost.check_exits(processes, tmp_path, "task")
    assert (tmp_path / "run" / ".lock.process1").exists()  # really two processes
    _, state = worker.final_state(tmp_path / "run")
    _, expected = worker.final_state(two_processes / "run")
    chex.assert_trees_all_close(state, expected, **TOLERANCE)
