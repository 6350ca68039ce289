"""The training loop end to end: short runs, determinism, resume after SIGKILL, fail-fast
configs, the non-finite stop, and the parallel modes agreeing."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from bnjax.checkpoints import Checkpointer
from bnjax.train import loop
from tests.train.helpers import final_state, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(**overrides):
    return tiny_config(**overrides)


def _final_state(workdir):
    return final_state(workdir)


def test_short_run_writes_metrics_checkpoints_and_learns(tmp_path):
    final = loop.train_and_evaluate(_tiny(num_steps=40, eval_every=20), str(tmp_path))
    assert final["eval/accuracy_running_stats"] > 0.25  # 10 classes: chance is 0.1
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert "bn/norm0/drift" in records[0] and "eval/accuracy_batch_stats" in records[4]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert _final_state(tmp_path)[0] == 40


def test_same_seed_same_metrics_and_state(tmp_path):
    first = loop.train_and_evaluate(_tiny(), str(tmp_path / "a"))
    second = loop.train_and_evaluate(_tiny(), str(tmp_path / "b"))
    assert first == second
    chex.assert_trees_all_equal(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))


def test_evaluation_off_the_logging_grid(tmp_path):
    final = loop.train_and_evaluate(_tiny(num_steps=6, log_every=4, eval_every=3), str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 4, 6]
    assert "loss" not in records[0] and "eval/accuracy_running_stats" in records[0]
    assert "loss" in final and "eval/accuracy_batch_stats" in final


def test_mixed_precision_keeps_params_and_statistics_in_float32(tmp_path):
    final = loop.train_and_evaluate(_tiny(mixed_precision=True), str(tmp_path))
    assert np.isfinite(final["loss"])
    state = _final_state(tmp_path)[1]
    for collection in ("params", "batch_stats"):
        dtypes = {np.asarray(leaf).dtype for leaf in jax.tree.leaves(state[collection])}
        assert dtypes == {np.dtype(np.float32)}, (collection, dtypes)


def test_rerun_of_a_finished_run_resumes_and_changes_nothing(tmp_path):
    loop.train_and_evaluate(_tiny(), str(tmp_path))
    before = _final_state(tmp_path)
    loop.train_and_evaluate(_tiny(), str(tmp_path))
    chex.assert_trees_all_equal(_final_state(tmp_path), before)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (dict(norm="batchnorm"), r"config.norm='batchnorm' is invalid"),
        (dict(batch_size=30, num_devices=None), r"config.batch_size=30 must divide evenly"),
        (dict(sampler="stratified"), r"config.sampler='stratified' is invalid"),
        (dict(learning_rate=-1.0), r"config.learning_rate=-1.0 is invalid"),
        (dict(ghost_batch_size=5), r"config.ghost_batch_size=5 must be a positive int"),
        (dict(norm="evonorm_b0", ghost_batch_size=4), r"config.ghost_batch_size applies to"),
        (dict(warmup_steps=12), r"config.warmup_steps=12 must be below"),
        (dict(model="mlp", norm="cross_iteration"), r"config.norm='cross_iteration' is fused"),
        (dict(norm="cross_iteration", ghost_batch_size=8), r"config.ghost_batch_size must be None"),
    ],
)
def test_invalid_configs_fail_fast_naming_the_key(tmp_path, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        loop.train_and_evaluate(_tiny(**override), str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing was written


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _tiny(learning_rate=1e30, warmup_steps=0, schedule="constant", optimizer="sgd")
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint is step"):
        loop.train_and_evaluate(config, str(tmp_path))
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as checkpointer:
        for step in checkpointer.all_steps():
            state = checkpointer.restore(step)
            assert all(
                np.all(np.isfinite(leaf))
                for leaf in jax.tree.leaves(state)
                if np.issubdtype(np.asarray(leaf).dtype, np.floating)
            )


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_parallel_modes_match_jit(tmp_path, mode):
    reference = loop.train_and_evaluate(_tiny(num_devices=None), str(tmp_path / "jit"))
    other = loop.train_and_evaluate(_tiny(num_devices=None, parallel=mode), str(tmp_path / mode))
    assert other["eval/accuracy_running_stats"] == pytest.approx(
        reference["eval/accuracy_running_stats"], abs=0.01
    )
    chex.assert_trees_all_close(
        _final_state(tmp_path / mode), _final_state(tmp_path / "jit"), atol=2e-4, rtol=2e-4
    )


def _command(workdir, steps):
    return [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        "--config=" + os.path.join(ROOT, "configs", "default.py"),
        f"--workdir={workdir}",
        "--config.model_features=(8, 16)",
        "--config.batch_size=32",
        f"--config.num_steps={steps}",
        "--config.warmup_steps=2",
        "--config.checkpoint_every=3",
        "--config.eval_every=1000",
        "--config.log_every=5",
        "--config.num_devices=1",
        # An averaged model in the state: its average must resume bit for bit too.
        "--config.ema_decay=0.9",
    ]


def test_killed_runs_resume_to_the_bit_identical_final_state(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    steps = 30
    subprocess.run(
        _command(tmp_path / "whole", steps), env=env, check=True, timeout=300, capture_output=True
    )
    rng = np.random.default_rng(0)
    checkpoints = tmp_path / "killed" / "checkpoints"
    killed, logs = 0, []
    # Two attempts are killed at a random moment after they start writing a new checkpoint
    # (so mid-training or mid-save, never only at start-up); each resumes from what the
    # previous one left. The third attempt runs to the end.
    for attempt in range(3):
        seen = set(os.listdir(checkpoints)) if checkpoints.exists() else set()
        logs.append(tmp_path / f"attempt{attempt}.log")
        with open(logs[-1], "w") as log:
            process = subprocess.Popen(
                _command(tmp_path / "killed", steps),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if attempt < 2:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if checkpoints.exists() and set(os.listdir(checkpoints)) - seen:
                    time.sleep(float(rng.uniform(0.0, 1.0)))
                    break
                time.sleep(0.02)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed += 1
        process.wait(timeout=300)
        if attempt == 2:
            assert process.returncode == 0, logs[-1].read_text()[-2000:]
    assert killed >= 1, "no attempt was killed: lower the kill delays"
    # The resume path really ran: a later attempt started from a killed one's checkpoint.
    assert any("resumed from" in log.read_text() for log in logs[1:]), "nothing to resume"
    whole_step, whole = _final_state(tmp_path / "whole")
    killed_step, resumed = _final_state(tmp_path / "killed")
    assert whole_step == killed_step == steps
    assert "ema" in whole  # the averaged model is part of what must resume bit for bit
    chex.assert_trees_all_equal(resumed, whole)  # bitwise
    steps_logged = [
        json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")
    ]
    assert steps_logged == sorted(set(steps_logged))  # no step logged twice after resumes


def test_evaluation_split_over_devices_counts_the_same():
    """With a mesh each evaluation batch is sharded over the devices (not recomputed whole on
    every one), padded to a multiple of their number and masked; the counts equal the
    single-device evaluation of every example."""
    from bnjax import data, parallel
    from bnjax.train import steps

    config = _tiny()
    test = data.load("clusters", "test", config=data.ClusterConfig(test_per_class=20))
    model = steps.make_model(**loop.model_settings(config, test.num_classes), for_training=False)
    state = steps.initial_state(model, loop.schedule_and_optimizer(config)[1], test.images[:2], 0)
    eval_step = steps.make_eval_step(model)
    mesh = parallel.data_mesh()
    whole = loop.evaluate(eval_step, state, test, 100)
    split = loop.evaluate(eval_step, parallel.replicate(state, mesh), test, 100, mesh)
    assert split == whole and whole["eval/examples"] == 200


# --------------------------------------------------------------------------- host fetches


def _watch_metric_fetches(monkeypatch):
    """[(steps trained when a `jax.device_get` call ran, the steps whose metrics it fetched)],
    for every call that fetched some step's training metrics.

    The runner is wrapped to count the steps and remember which step returned which metric
    arrays (by identity); `jax.device_get` is wrapped to look for them in what it is given."""
    trained, owner, fetches = [0], {}, []
    runner, device_get = loop._runner, jax.device_get

    def counting_runner(config, mesh, train_step):
        run = runner(config, mesh, train_step)

        def counted(state, batch):
            state, metrics = run(state, batch)
            trained[0] += 1
            # Keep each leaf alive with its step: an id is unique only while its object lives,
            # and a freed metric's id reused by an evaluation array would read as a fetch.
            owner.update((id(leaf), (trained[0], leaf)) for leaf in jax.tree.leaves(metrics))
            return state, metrics

        return counted

    def watched_device_get(tree):
        steps = {
            owner[id(leaf)][0]
            for leaf in jax.tree.leaves(tree)
            if id(leaf) in owner and owner[id(leaf)][1] is leaf
        }
        if steps:
            fetches.append((trained[0], sorted(steps)))
        return device_get(tree)

    monkeypatch.setattr(loop, "_runner", counting_runner)
    monkeypatch.setattr(jax, "device_get", watched_device_get)
    return fetches


def test_the_host_fetches_the_metrics_only_at_the_steps_that_need_them(tmp_path, monkeypatch):
    """Between log, checkpoint and evaluation steps the loop only queues each step's metrics
    (the device runs ahead); at those steps one transfer fetches every queued step's."""
    fetches = _watch_metric_fetches(monkeypatch)
    config = _tiny(num_steps=12, log_every=4, eval_every=12, checkpoint_every=6)
    loop.train_and_evaluate(config, str(tmp_path))
    assert fetches == [
        (4, [1, 2, 3, 4]),  # a log step
        (6, [5, 6]),  # a checkpoint step: checked before the save
        (8, [7, 8]),
        (12, [9, 10, 11, 12]),  # the last: log, checkpoint and evaluation
    ]


def test_deferred_fetches_log_the_same_records(tmp_path):
    """The records of the logged steps are the numbers a per-step fetch logs: a run logging
    every step (fetching every step) and one logging every 4th agree on steps 4, 8, 12."""
    every_step = loop.train_and_evaluate(_tiny(log_every=1), str(tmp_path / "every"))
    every_4th = loop.train_and_evaluate(_tiny(log_every=4), str(tmp_path / "fourth"))
    assert every_step == every_4th

    def records(name):
        by_step = {}
        for line in open(tmp_path / name / "metrics.jsonl"):
            record = json.loads(line)
            del record["time"]
            by_step[record.pop("step")] = record
        return by_step

    every, fourth = records("every"), records("fourth")
    assert sorted(fourth) == [4, 6, 8, 12]  # eval_every=6: step 6 holds the evaluation only
    assert fourth[4].keys() == every[4].keys() and "loss" not in fourth[6]
    assert {step: {k: every[step][k] for k in record} for step, record in fourth.items()} == fourth
