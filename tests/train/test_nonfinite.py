"""A broken run is never hidden: a NaN/inf that reaches the training state stops the run at
its step naming the leaf, batch norms report the batches whose statistics they skipped,
evaluation reports the non-finite held-out values it met, and batch renorm engages within the
run (or says that it never does)."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from bnjax import data
from bnjax.train import cli, loop, steps
from bnjax.train.checkpoints import Checkpointer
from bnjax.train.config import check_config
from tests.train.helpers import final_state, tiny_config


def _tiny(**overrides):
    settings = dict(
        num_steps=4, warmup_steps=1, log_every=1, eval_every=4, checkpoint_every=2, progress=False
    )
    return tiny_config(**(settings | overrides))


def _poison_training_batch(monkeypatch, step: int, value: float) -> None:
    """One pixel of one example of the batch of training step `step` becomes `value`."""
    batches = loop._training_batches

    def poisoned(train, sampler, start_step):
        for number, batch in enumerate(batches(train, sampler, start_step), start_step + 1):
            if number == step:
                images = batch["image"].copy()
                images[5, 2, 3, 1] = value
                batch = dict(batch, image=images)
            yield batch

    monkeypatch.setattr(loop, "_training_batches", poisoned)


def _records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


# --------------------------------------------------------------------------- the training state


def test_a_nan_pixel_stops_the_run_at_its_step_with_exit_1(tmp_path, monkeypatch, capsys):
    """The loss of the poisoned step stays finite, but its gradient is not: the run stops at
    that step, before saving it, naming the first leaf and the last good checkpoint."""
    _poison_training_batch(monkeypatch, step=3, value=math.nan)
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: loop.train_and_evaluate(_tiny(), str(tmp_path)))
    assert exit_.value.code == cli.RUN_FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: step 3 made the training state non-finite: params/conv0/")
    assert "1 NaN/inf input value" in lines[0] and "last good checkpoint is step 2" in lines[0]
    assert final_state(tmp_path)[0] == 2  # the non-finite state was never saved
    assert max(record["step"] for record in _records(tmp_path)) == 2


@pytest.mark.parametrize(
    ("norm", "value", "parallel"),
    [("batch_renorm", math.inf, "jit"), ("group", -math.inf, "shard_map")],
)
def test_a_non_finite_input_stops_every_norm_and_mode(tmp_path, monkeypatch, norm, value, parallel):
    _poison_training_batch(monkeypatch, step=3, value=value)
    config = _tiny(norm=norm, parallel=parallel, num_devices=None if parallel != "jit" else 1)
    with pytest.raises(loop.NonFiniteError) as error:
        loop.train_and_evaluate(config, str(tmp_path))
    assert error.value.step == 3 and error.value.last_good_step == 2
    assert "params/conv0/kernel" in error.value.leaves
    assert any(leaf.startswith("grads/") for leaf in error.value.leaves)
    assert isinstance(error.value, loop.NonFiniteLossError)  # the former name still catches it
    assert final_state(tmp_path)[0] == 2


def test_a_huge_finite_input_is_reported_by_the_batch_norms_that_skip_it(
    tmp_path, monkeypatch, capsys
):
    """1e30 overflows the batch variance of the first norm: the layer leaves its running
    statistics as they were (the state stays finite, so the run goes on) and says so, at the
    step, in the metrics and in one printed line. No counter is reported as -1."""
    _poison_training_batch(monkeypatch, step=3, value=1e30)
    loop.train_and_evaluate(_tiny(), str(tmp_path))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: step 3: the batch statistics of norm0")
    records = {record["step"]: record for record in _records(tmp_path)}
    assert records[3]["bn/norm0/nonfinite"] > 0
    assert records[2]["bn/norm0/nonfinite"] == 0 and records[4]["bn/norm0/nonfinite"] == 0
    assert not any(key.endswith(("/skipped", "/count")) for key in records[3])
    step, state = final_state(tmp_path)
    assert step == 4
    assert all(np.isfinite(leaf).all() for leaf in _floating_leaves(state))


@pytest.mark.parametrize(
    ("log_every", "checkpoint_every", "found_at", "last_good"),
    [(4, 12, 8, None), (12, 4, 8, 4)],  # found by a log step; by a checkpoint step
)
def test_a_nan_between_fetches_never_reaches_a_checkpoint_and_names_its_step(
    tmp_path, monkeypatch, log_every, checkpoint_every, found_at, last_good
):
    """Step 5 goes non-finite, every step after it too; the flags are fetched at step 8 (the
    next log or checkpoint step), before its save: the error names step 5, not 8, and the
    checkpoints hold nothing after the last good step."""
    _poison_training_batch(monkeypatch, step=5, value=math.nan)
    config = _tiny(
        num_steps=12, log_every=log_every, eval_every=12, checkpoint_every=checkpoint_every
    )
    with pytest.raises(loop.NonFiniteError) as error:
        loop.train_and_evaluate(config, str(tmp_path))
    assert error.value.step == 5 and error.value.last_good_step == last_good
    assert str(error.value).startswith("step 5 made the training state non-finite: params/")
    assert f"Stopped (found at step {found_at}) without saving that state" in str(error.value)
    with Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
        assert checkpointer.latest_step() == last_good
    assert all(record["step"] < 5 for record in _records(tmp_path))


def test_a_skipped_batch_between_log_steps_is_reported_with_its_step(tmp_path, monkeypatch, capsys):
    """The batch-norm warning of a step without a record still names that step, once."""
    _poison_training_batch(monkeypatch, step=3, value=1e30)
    loop.train_and_evaluate(_tiny(log_every=4, checkpoint_every=4), str(tmp_path))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: step 3: the batch statistics of norm0")
    assert [record["step"] for record in _records(tmp_path)] == [4]


def _floating_leaves(state):
    return [
        np.asarray(leaf)
        for leaf in jax.tree.leaves(state)
        if np.issubdtype(np.asarray(leaf).dtype, np.floating)
    ]


# --------------------------------------------------------------------------- evaluation


def _untrained(config):
    test = data.load("clusters", "test", seed=config.seed)
    model = steps.make_model(**loop.model_settings(config, test.num_classes), for_training=False)
    optimizer = loop.schedule_and_optimizer(config)[1]
    state = steps.initial_state(model, optimizer, test.images[:2], 0)
    return test, steps.make_eval_step(model), state


def test_evaluation_reports_the_non_finite_inputs_it_met(capsys):
    test, eval_step, state = _untrained(_tiny())
    clean = loop.evaluate(eval_step, state, test, 500)
    assert clean["eval/nonfinite_inputs"] == 0 and clean["eval/nonfinite_outputs_batch_stats"] == 0
    assert "warning" not in capsys.readouterr().out

    images = test.images.copy()
    images[7, 0, 0, 0] = math.nan
    poisoned = loop.evaluate(eval_step, state, dataclasses.replace(test, images=images), 500)
    assert poisoned["eval/nonfinite_inputs"] == 1
    # One NaN spoils the batch statistics of its whole batch (the first of 4 x 500). Whether
    # the outputs then hold NaN depends on the backend (XLA's CPU code may turn it into 0):
    # the input count is what says so.
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("warning: evaluation met 1 held-out example"), out
    assert "their batches hold 500 examples" in out[0]


def test_evaluation_reports_the_non_finite_outputs_it_met(capsys):
    test, eval_step, state = _untrained(_tiny())
    state["params"]["head"]["bias"] = state["params"]["head"]["bias"].at[3].set(math.inf)
    result = loop.evaluate(eval_step, state, test, 500)
    assert result["eval/nonfinite_inputs"] == 0
    assert result["eval/nonfinite_outputs_running_stats"] == 2000
    assert result["eval/nonfinite_outputs_batch_stats"] == 2000
    assert "non-finite outputs for 2000 (running statistics)" in capsys.readouterr().out


# --------------------------------------------------------------------------- batch renorm


def test_batch_renorm_engages_within_a_default_run(tmp_path, capsys):
    loop.train_and_evaluate(_tiny(norm="batch"), str(tmp_path / "batch"))
    loop.train_and_evaluate(_tiny(norm="batch_renorm"), str(tmp_path / "renorm"))
    assert "batch renorm" not in capsys.readouterr().out
    batch, renorm = (final_state(tmp_path / name)[1]["params"] for name in ("batch", "renorm"))
    # The r/d correction changes the training (with the 5000-step warm-up of the bare
    # RenormSchedule it was plain batch norm, identical up to float rounding).
    assert _largest_difference(batch, renorm) > 1e-3


def test_a_run_that_ends_before_renorm_engages_says_so(tmp_path, capsys, monkeypatch):
    """The warning comes before training (here stopped at once: the point is the line)."""

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(loop, "_sampler", stop)
    for warmup, warned in [(3, True), (2, False), (None, False)]:
        config = _tiny(norm="batch_renorm", renorm_warmup_steps=warmup)  # 4 steps
        with pytest.raises(RuntimeError, match="stopped before training"):
            loop.train_and_evaluate(config, str(tmp_path))
        out = capsys.readouterr().out
        assert ("warning: batch renorm never engages in this run" in out) == warned, warmup
    config = _tiny(norm="batch", renorm_warmup_steps=10)  # no renorm: nothing to say
    with pytest.raises(RuntimeError, match="stopped before training"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert "renorm" not in capsys.readouterr().out


def _largest_difference(tree, other):
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True)
    )


def test_the_renorm_schedule_scales_with_the_run():
    schedule = steps.renorm_schedule(600)
    assert (schedule.warmup_steps, schedule.r_relax_steps, schedule.d_relax_steps) == (60, 300, 180)
    given = steps.renorm_schedule(600, warmup_steps=0, r_relax_steps=5, d_relax_steps=0)
    assert (given.warmup_steps, given.r_relax_steps, given.d_relax_steps) == (0, 5, 0)
    assert steps.renorm_engages(schedule, 600) and not steps.renorm_engages(schedule, 61)
    assert steps.renorm_engages(given, 1)  # relax 0: full bounds from the first step


@pytest.mark.parametrize("key", ["renorm_warmup_steps", "renorm_r_relax_steps"])
def test_renorm_schedule_keys_are_checked(key):
    with pytest.raises(ValueError, match=rf"config.{key}=-1 is invalid"):
        check_config(_tiny(**{key: -1}), 1)
