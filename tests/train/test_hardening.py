"""What a user of scripts/train.py hits first: every norm and model trains, evaluation counts
every example the same way on any number of devices, the final state is never lost, a
config that would fail fails before training, and the command line answers in one line."""

import glob
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from bnjax import data, parallel
from bnjax.checkpoints import Checkpointer
from bnjax.models import BATCH_STATISTICS_NORMS, NORMS
from bnjax.train import loop, steps
from bnjax.train.defaults import DESCRIPTIONS, base_config
from bnjax.train.workdir import ConfigChangedError, WorkdirBusyError, WorkdirLock
from tests.train.helpers import final_state, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny(**overrides):
    settings = dict(
        num_steps=4, warmup_steps=1, log_every=2, eval_every=4, checkpoint_every=2, progress=False
    )
    return tiny_config(**(settings | overrides))


def _final(workdir):
    return final_state(workdir)


# --------------------------------------------------------------------------- every choice trains


@pytest.mark.parametrize("norm", tuple(NORMS))
def test_every_norm_trains(tmp_path, norm):
    final = loop.train_and_evaluate(_tiny(norm=norm), str(tmp_path))
    assert np.isfinite(final["loss"]) and final["eval/examples"] == 2000
    step, state = _final(tmp_path)
    assert step == 4 and ("batch_stats" in state) == (norm in BATCH_STATISTICS_NORMS)


@pytest.mark.parametrize(
    ("model", "norm"),
    [
        ("mlp", "batch"),
        ("mlp", "group"),
        # ResNet-20 compiles for ~20 s each; tests/models runs it with every norm anyway.
        pytest.param("resnet20", "group", marks=pytest.mark.slow),
        pytest.param("resnet20", "batch_renorm", marks=pytest.mark.slow),
    ],
)
def test_models_train_with_batch_and_per_example_norms(tmp_path, model, norm):
    config = _tiny(
        model=model, norm=norm, num_steps=2, eval_every=2, eval_batch_size=1000, norm_groups=4
    )
    final = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(final["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "small_cnn", "resnet20", "resnet18"])
@pytest.mark.parametrize("norm", tuple(NORMS))
def test_every_model_with_every_norm_trains(tmp_path, model, norm):
    if model == "mlp" and norm == "instance":
        pytest.skip("rejected by check_config: instance norm needs spatial axes")
    if model == "mlp" and norm == "cross_iteration":
        pytest.skip("rejected by check_config: cross-iteration BN is fused with a conv")
    config = _tiny(
        model=model, norm=norm, num_steps=2, eval_every=2, eval_batch_size=1000, norm_groups=4
    )
    assert np.isfinite(loop.train_and_evaluate(config, str(tmp_path))["loss"])


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
@pytest.mark.parametrize(
    "norm",
    [
        "group",
        "batch_renorm",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("batch", "layer", "instance", "none")),
        pytest.param("cross_iteration", marks=pytest.mark.slow),
    ],
)
def test_parallel_modes_train_every_kind_of_norm(tmp_path, mode, norm):
    config = _tiny(norm=norm, parallel=mode, num_devices=None)
    assert np.isfinite(loop.train_and_evaluate(config, str(tmp_path))["loss"])


# --------------------------------------------------------------------------- evaluation


def test_evaluation_batches_cover_every_example_in_near_equal_batches():
    for num_examples, batch_size in [(2000, 500), (2000, 1999), (359, 64), (7, 100), (10, 3)]:
        batches = loop.evaluation_batches(num_examples, batch_size)
        sizes = [len(rows) for rows in batches]
        assert np.array_equal(np.concatenate(batches), np.arange(num_examples))
        assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1


def test_evaluation_is_the_same_on_1_3_and_8_devices(tmp_path):
    """The held-out split (2000 examples, not a multiple of 3 or of the batch) is evaluated
    whole; padding rows are masked out of batch statistics, so the counts do not depend on the
    number of devices the batch is split over."""
    loop.train_and_evaluate(_tiny(num_steps=6), str(tmp_path))
    config = _tiny()
    test = data.load("clusters", "test", seed=config.seed)
    model = steps.make_model(**loop.model_settings(config, test.num_classes), for_training=False)
    template = steps.initial_state(
        model, loop.schedule_and_optimizer(config)[1], test.images[:2], 0
    )
    with Checkpointer(os.path.join(tmp_path, "checkpoints")) as checkpointer:
        state = checkpointer.restore(6, template)
    eval_step = steps.make_eval_step(model)
    results = {"no mesh": loop.evaluate(eval_step, state, test, 300)}
    for devices in (1, 3, 8):
        mesh = parallel.data_mesh(devices)
        replicated = parallel.replicate(state, mesh)
        results[devices] = loop.evaluate(eval_step, replicated, test, 300, mesh)
    assert all(result == results["no mesh"] for result in results.values()), results
    assert results[3]["eval/examples"] == 2000
    # Batch statistics really come from the real rows only: with padding unmasked, the
    # 8-row tail batch of 2000 = 6 x 332 + ... would change; check the masked count equals
    # evaluating the same rows unpadded, batch by batch.
    manual = 0
    for rows in loop.evaluation_batches(len(test), 300):
        manual += int(eval_step(state, test.images[rows], test.labels[rows])[1])
    assert manual / len(test) == results[8]["eval/accuracy_batch_stats"]


def test_eval_batch_of_one_with_batch_statistics_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"config.eval_batch_size=1: the batch-statistics"):
        loop.train_and_evaluate(_tiny(model="mlp", eval_batch_size=1), str(tmp_path))
    assert not os.listdir(tmp_path)
    # Per-example norms have no batch statistics to compute: a batch of one is fine.
    loop.train_and_evaluate(
        _tiny(norm="group", eval_batch_size=1, num_steps=2, eval_every=2), str(tmp_path / "group")
    )


def test_group_counts_that_do_not_fit_the_widths_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config.norm_groups=8 does not fit .* \[8\] do not"):
        loop.train_and_evaluate(_tiny(model="mlp", norm="group"), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.norm_groups=3 does not fit the layer widths"):
        loop.train_and_evaluate(_tiny(model="resnet20", norm="group", norm_groups=3), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_evaluation_batches_too_small_for_batch_statistics_are_refused():
    config = _tiny(eval_batch_size=2)
    loop.check_evaluation_batches(config, 2000)  # 1000 batches of 2
    with pytest.raises(ValueError, match=r"the smallest of 1; batch statistics"):
        loop.check_evaluation_batches(config, 359)  # 180 batches: one of 1
    loop.check_evaluation_batches(_tiny(eval_batch_size=2, norm="layer"), 359)


def test_a_failing_evaluation_does_not_cost_the_step_s_checkpoint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.train_and_evaluate(_tiny(), str(tmp_path))
    assert _final(tmp_path)[0] == 4  # saved before the evaluation at step 4


# --------------------------------------------------------------------------- the final state


def test_final_step_is_saved_when_its_corrupt_copy_cannot_be_quarantined(tmp_path):
    loop.train_and_evaluate(_tiny(), str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    reference = _final(tmp_path)
    # Corrupt step 4's data and make quarantine impossible ('corrupt' is a file, not a folder).
    files = glob.glob(f"{checkpoints}/4/state/**/d/*", recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:  # same size, other bytes: only the checksums see it
        handle.seek(os.path.getsize(largest) // 2)
        handle.write(b"\x00\x01" * 8)
    (checkpoints / "corrupt").write_text("not a folder")
    with pytest.warns(UserWarning):
        loop.train_and_evaluate(_tiny(), str(tmp_path))
    step, state = _final(tmp_path)
    assert step == 4
    chex.assert_trees_all_equal(state, reference[1])  # retrained from step 2, bit-identical


def test_a_run_whose_final_checkpoint_is_not_written_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(Checkpointer, "save", lambda self, step, state, **options: False)
    with pytest.raises(loop.FinalCheckpointError, match=r"final state \(step 4\) is not safely"):
        loop.train_and_evaluate(_tiny(), str(tmp_path))


# --------------------------------------------------------------------------- workdir


def test_resolved_config_is_saved_and_a_changed_resume_is_refused(tmp_path, capsys):
    loop.train_and_evaluate(_tiny(), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["learning_rate"] == 0.05 and saved["model_features"] == [8, 16]
    with pytest.raises(ConfigChangedError) as error:
        loop.train_and_evaluate(_tiny(learning_rate=0.1, num_steps=6), str(tmp_path))
    assert "config.learning_rate: 0.05 -> 0.1" in str(error.value)
    assert "config.num_steps: 4 -> 6" in str(error.value)
    assert _final(tmp_path)[0] == 4  # nothing trained
    # Bookkeeping changes are reported, not refused.
    loop.train_and_evaluate(_tiny(log_every=1), str(tmp_path))
    assert "note: resuming with config.log_every: 2 -> 1" in capsys.readouterr().out
    # Allowed explicitly: trains on with the new values, which become the saved ones.
    loop.train_and_evaluate(_tiny(num_steps=6), str(tmp_path), allow_config_change=True)
    assert _final(tmp_path)[0] == 6
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 6


def test_a_second_run_on_a_busy_workdir_stops_at_once(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusyError, match=r"another run \(process \d+\)"):
            loop.train_and_evaluate(_tiny(), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    loop.train_and_evaluate(_tiny(), str(tmp_path))  # released: the next run goes ahead


# --------------------------------------------------------------------------- command line


def _script(*arguments, env=None):
    command = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *arguments]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def _config_file():
    return "--config=" + os.path.join(ROOT, "configs", "default.py")


def test_every_config_key_is_described():
    assert sorted(DESCRIPTIONS) == sorted(base_config())


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--config.bogus=1", "error: --config.bogus is not a config key; the keys are seed,"),
        ("--config.batch_size=abc", "error: flag --config.batch_size=abc: invalid literal"),
        ("--config.dataset=mnist", "error: TFDS dataset 'mnist' is not prepared under"),
    ],
)
def test_command_line_mistakes_end_in_one_line_and_exit_2(tmp_path, argument, message):
    result = _script(
        _config_file(),
        f"--workdir={tmp_path / 'run'}",
        argument,
        env={"TFDS_DATA_DIR": str(tmp_path / "tfds")},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_help_lists_config_keys_with_defaults_and_meanings():
    result = _script("--help")
    assert result.returncode == 0
    for key in DESCRIPTIONS:
        assert f"--config.{key}=" in result.stdout, key
    assert "--config.norm='batch'" in result.stdout and "batch | batch_renorm" in result.stdout


def test_busy_workdir_exits_2_naming_the_lock(tmp_path):
    with WorkdirLock(str(tmp_path)):
        result = _script(_config_file(), f"--workdir={tmp_path}", "--config.num_steps=60")
    assert result.returncode == 2
    assert "another run (process" in result.stderr and ".lock is locked" in result.stderr


def test_devices_are_not_a_resume_change(tmp_path):
    """A run resumed on another number of devices goes on (the same numbers up to rounding)."""
    loop.train_and_evaluate(_tiny(num_steps=2, eval_every=2), str(tmp_path))
    final = loop.train_and_evaluate(
        _tiny(num_steps=2, eval_every=2, num_devices=jax.device_count()), str(tmp_path)
    )
    assert final["eval/examples"] == 2000
