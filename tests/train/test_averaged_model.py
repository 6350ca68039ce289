"""config.ema_decay: the averaged model in the train state, its evaluation, checkpoints, resume,
the sharded modes, and the tools that read the workdir."""

import itertools
import json
import shutil

import chex
import jax
import ml_collections
import numpy as np
import pytest

from bnjax import data, lifecycle
from bnjax.checkpoints import Checkpointer
from bnjax.lifecycle.__main__ import main as lifecycle_main
from bnjax.train import loop
from bnjax.train.config import check_config
from bnjax.train.defaults import base_config
from bnjax.train.steps import make_eval_step, make_model
from bnjax.train.trained_run import load_workdir
from bnjax.train.workdir import BOOKKEEPING_KEYS, config_changes
from tests.train.helpers import final_state, tiny_config

DECAY = 0.8
EMA_RUN = dict(
    model="mlp",
    num_steps=6,
    log_every=3,
    eval_every=3,
    checkpoint_every=1,
    keep_checkpoints=10,
    ema_decay=DECAY,
    progress=False,
)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """(workdir, final metrics) of a 6-step mlp run with an EMA, every step checkpointed."""
    workdir = tmp_path_factory.mktemp("ema_run")
    metrics = loop.train_and_evaluate(tiny_config(**EMA_RUN), str(workdir))
    return workdir, metrics


def _restore_all(workdir):
    with Checkpointer(str(workdir / "checkpoints")) as checkpointer:
        return {step: checkpointer.restore(step) for step in checkpointer.all_steps()}


def test_the_checkpointed_average_follows_the_ema_recurrence(ema_run):
    workdir, metrics = ema_run
    states = _restore_all(workdir)
    assert sorted(states) == list(range(1, 7))
    f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
    for step in range(2, 7):
        before, after = states[step - 1]["ema"], states[step]["ema"]
        assert int(after["count"]) == int(after["step"]) == step
        for part in ("params", "batch_stats"):
            want = jax.tree.map(
                lambda old, new: DECAY * old + (1 - DECAY) * new,
                f64(before[part]),
                f64(states[step][part]),
            )
            chex.assert_trees_all_close(f64(after[part]), want, rtol=1e-6, atol=1e-7)
    # The average is not the trained model, and both are evaluated.
    assert not np.allclose(
        states[6]["ema"]["params"]["head"]["kernel"], states[6]["params"]["head"]["kernel"]
    )
    for name in ("eval/ema_accuracy_running_stats", "eval/ema_accuracy_batch_stats"):
        assert 0.0 <= metrics[name] <= 1.0
    assert "eval/ema_examples" not in metrics


def test_resume_from_a_middle_checkpoint_ends_bit_identical(ema_run, tmp_path, capsys):
    workdir, metrics = ema_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    for step in (4, 5, 6):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    again = loop.train_and_evaluate(tiny_config(**EMA_RUN), str(resumed))
    assert "checkpoints step 3" in capsys.readouterr().out  # it resumed, from step 3
    step, state = final_state(resumed)
    whole_step, whole = final_state(workdir)
    assert step == whole_step == 6
    chex.assert_trees_all_equal(state, whole)  # bitwise, the average included
    assert again["eval/ema_accuracy_running_stats"] == metrics["eval/ema_accuracy_running_stats"]


def test_recalibrated_evaluation_uses_the_first_training_batches(ema_run, tmp_path):
    """ema_statistics changes the evaluation only (a bookkeeping key): re-run over the finished
    workdir, the loop evaluates the averaged model recalibrated on the first 2 training
    batches, which this recomputes through the public pieces."""
    workdir, _ = ema_run
    copy = tmp_path / "recalibrated"
    shutil.copytree(workdir, copy)
    config = tiny_config(**EMA_RUN, ema_statistics="recalibrate", ema_recalibration_batches=2)
    metrics = loop.train_and_evaluate(config, str(copy))
    _, state = final_state(copy)
    train = data.load(config.dataset, "train", seed=config.seed)
    test = data.load(config.dataset, "test", seed=config.seed)
    sampler = loop._sampler(config, train)
    batches = [b["image"] for b in itertools.islice(loop._training_batches(train, sampler, 0), 2)]
    model = make_model(**loop.model_settings(config, train.num_classes), for_training=False)
    average = lifecycle.AveragedState(
        state["ema"]["params"], state["ema"]["batch_stats"], state["ema"]["count"], 0
    )
    variables = lifecycle.averaged_variables(
        model, average, statistics="recalibrate", batches=batches
    )
    want = loop.evaluate(make_eval_step(model), variables, test, config.eval_batch_size)
    assert metrics["eval/ema_accuracy_running_stats"] == want["eval/accuracy_running_stats"]
    chex.assert_trees_all_equal(state, final_state(workdir)[1])  # training untouched


def test_shard_map_carries_the_same_average_as_jit(ema_run, tmp_path):
    config = tiny_config(**EMA_RUN, parallel="shard_map", num_devices=2)
    loop.train_and_evaluate(config, str(tmp_path / "shard_map"))
    _, sharded = final_state(tmp_path / "shard_map")
    _, reference = final_state(ema_run[0])
    chex.assert_trees_all_close(sharded["ema"], reference["ema"], atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_pmap_carries_the_same_average_as_jit(ema_run, tmp_path):
    config = tiny_config(**EMA_RUN, parallel="pmap", num_devices=None)
    loop.train_and_evaluate(config, str(tmp_path / "pmap"))
    _, pmapped = final_state(tmp_path / "pmap")
    _, reference = final_state(ema_run[0])
    chex.assert_trees_all_close(pmapped["ema"], reference["ema"], atol=2e-4, rtol=2e-4)


def test_validate_and_export_read_an_ema_workdir(ema_run, capsys):
    workdir, _ = ema_run
    assert lifecycle_main(["validate", str(workdir / "checkpoints")]) == 0
    assert "ema/norm0" in capsys.readouterr().out  # the averaged statistics are checked too
    _, state = final_state(workdir)
    trained = load_workdir(str(workdir))
    chex.assert_trees_all_equal(trained.variables["params"], state["params"])
    averaged = load_workdir(str(workdir), averaged=True)
    chex.assert_trees_all_equal(averaged.variables["params"], state["ema"]["params"])
    chex.assert_trees_all_equal(averaged.variables["batch_stats"], state["ema"]["batch_stats"])


def test_workdirs_saved_before_the_keys_resume_and_bad_values_are_refused():
    current = json.loads(json.dumps(base_config().to_dict()))  # as config.json holds it
    saved = {k: v for k, v in current.items() if not k.startswith("ema_")}
    assert config_changes(saved, base_config(), BOOKKEEPING_KEYS) == ([], [])
    recalibrated = base_config()
    recalibrated.ema_statistics = "recalibrate"
    # How the average is evaluated never blocks a resume; whether there is one does.
    assert config_changes(current, recalibrated, BOOKKEEPING_KEYS) == (
        [],
        ["config.ema_statistics: 'average' -> 'recalibrate'"],
    )
    averaged = base_config()
    averaged.ema_decay = 0.9
    assert config_changes(saved, averaged, BOOKKEEPING_KEYS)[0] == ["config.ema_decay: 0.0 -> 0.9"]
    for key, value in [
        ("ema_decay", 1.0),
        ("ema_decay", -0.5),
        ("ema_statistics", "median"),
        ("ema_recalibration_batches", 0),
    ]:
        config = ml_collections.ConfigDict(base_config().to_dict())
        config[key] = value
        with pytest.raises(ValueError, match=f"config.{key}="):
            check_config(config, 1)


def test_a_norm_without_statistics_averages_the_parameters_only(tmp_path):
    config = tiny_config(**EMA_RUN | {"checkpoint_every": 6}, norm="layer")
    metrics = loop.train_and_evaluate(config, str(tmp_path / "layer"))
    _, state = final_state(tmp_path / "layer")
    assert set(state["ema"]) == {"params", "count", "step"}
    assert 0.0 <= metrics["eval/ema_accuracy_running_stats"] <= 1.0
