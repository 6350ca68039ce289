"""The study end to end on a tiny grid (with resume), and its training/measurement pieces
against references."""

import math
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import data, study
from bnjax.study import experiment, grid, report, runner, training
from bnjax.train.steps import initial_state

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import batch_study


def tiny_config():
    config = batch_study.get_config("quick")
    config.clusters.train_per_class, config.clusters.test_per_class = 60, 20
    config.example_budget = 640
    config.model_features = (8, 16)
    config.run_conditions = ("uniform", "skewed")
    config.normalizers = ("none", "batch", "group", "batch+recalibration")
    config.lr_candidates = (0.1,)
    config.dose_skews = (0.0, 0.8)
    config.dose_batch_sizes = (32,)
    config.dose_normalizers = ("batch",)
    config.other_bn_momenta = (0.99,)
    config.momentum_conditions = ("skewed",)
    config.length_fractions = (0.5,)
    config.length_conditions = ("skewed",)
    config.length_normalizers = ("batch",)
    config.probe_size, config.probe_points, config.stability_batches = 60, 5, 4
    config.eval_batch_size, config.population_batch_size = 100, 200
    config.recalibration_batch_size = 50
    config.bootstrap_resamples = 200
    config.progress = False
    return config


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    lines = []
    rows = runner.run_study(tiny_config(), workdir, log=lines.append)
    return workdir, rows, lines


# Every numeric column and the range its values must lie in (None allowed where noted).
RANGES = {
    "probe_loss_final": (0, math.inf),
    "probe_loss_auc": (0, math.inf),
    "probe_oscillation": (0, math.inf),
    "probe_accuracy_final": (0, 1),
    "validation_accuracy": (0, 1),
    "train_loss": (0, math.inf),
    "gradient_noise": (0, 2),
    "update_noise": (0, 2),
    "accuracy_eval": (0, 1),
    "accuracy_batch_stats": (0, 1),
    "accuracy_batch_stats_train_b": (0, 1),
    "accuracy_gap": (-1, 1),
    "silhouette": (-1, 1),
    "intra_inter": (0, math.inf),
    "train_seconds": (0, math.inf),
    "diverged": (0, 1),
}


def test_tiny_study_writes_every_output(tiny_study):
    workdir, rows, lines = tiny_study
    config = tiny_config()
    assert len(rows) == runner.planned_runs(config)
    assert {r["family"] for r in rows} == {"lr", "table", "dose", "momentum", "length"}
    assert {r["dataset"] for r in rows} == {"clusters"}
    assert report.read_csv(os.path.join(workdir, "results.csv"))[0].keys() == rows[0].keys()
    table = open(os.path.join(workdir, "table.md")).read()
    assert "### Table 1 with numbers: batch norm" in table and "## Columns" in table
    assert grid.PAPER_LABELS["skewed"] in table and "Dose-response, batch" in table
    assert "BN momentum" in table and "Training length" in table
    verdicts = open(os.path.join(workdir, "verdicts.md")).read()
    assert "| P8 | paper |" in verdicts and "Holm" in verdicts
    for name in (
        "headline",
        "dose_response",
        "probe_curves",
        "running_bias",
        "stability_by_layer",
        "batch_statistics",
        "features_pca",
    ):
        with open(os.path.join(workdir, "plots", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert lines[-1].startswith(f"study finished: {len(rows)} runs")


def test_every_metric_is_finite_and_in_range(tiny_study):
    _, rows, _ = tiny_study
    for row in rows:
        excess = [k for k in row if k.startswith("stability_")]
        assert len(excess) == 2 * 2 * 2  # iid/excess x mean/var x two norm layers
        for key in excess:
            assert math.isfinite(row[key]), (key, row)
        for key, (low, high) in RANGES.items():
            assert math.isfinite(row[key]) and low <= row[key] <= high, (key, row[key])
        has_running = row["normalizer"] in ("batch", "batch+recalibration")
        assert (row["running_bias"] is not None) == has_running
        assert row["examples"] == row["num_steps"] * row["batch_size"]


def test_shared_runs_and_normalizer_facts(tiny_study):
    _, rows, _ = tiny_study
    by = {(r["family"], r["condition"], r["normalizer"], r["seed"]): r for r in rows}
    for seed in (0, 1):
        for condition in ("uniform", "skewed"):
            g = by[("table", condition, "group", seed)]
            assert g["accuracy_gap"] == 0.0  # per-example statistics: both modes agree
            bn = by[("table", condition, "batch", seed)]
            recal = by[("table", condition, "batch+recalibration", seed)]
            for key in ("train_loss", "gradient_noise", "probe_loss_auc"):
                assert recal[key] == bn[key]  # one training run
            assert recal["running_bias"] < bn["running_bias"]
        # The dose cell at skew 0.8, B 32 is the table's skewed cell, trained once.
        dose = by[("dose", "b32_s0.8", "batch", seed)]
        assert dose["accuracy_eval"] == by[("table", "skewed", "batch", seed)]["accuracy_eval"]
        short = by[("length", "skewed", "batch", seed)]
        assert short["examples"] == 320


def test_resume_skips_finished_runs_and_refuses_another_config(tiny_study, tmp_path):
    workdir, rows, _ = tiny_study
    config = tiny_config()
    resumed_dir = str(tmp_path / "resumed")
    os.makedirs(resumed_dir)
    for name in ("study_config.json",):
        with (
            open(os.path.join(workdir, name)) as f,
            open(os.path.join(resumed_dir, name), "w") as g,
        ):
            g.write(f.read())
    # An interrupted study: the first half of the rows written, the rest missing.
    half = len(rows) // 2
    report.write_csv(rows[:half], os.path.join(resumed_dir, "results.csv"))
    lines = []
    resumed = runner.run_study(config, resumed_dir, log=lines.append)
    assert lines[0] == f"resuming: {half} runs already in {resumed_dir}/results.csv"
    assert "cells trained now" in lines[-1] and "(0 cells" not in lines[-1]
    key = runner.row_id
    assert sorted(map(key, resumed)) == sorted(map(key, rows))
    again = {key(r): r for r in resumed}
    for row in rows[half:]:  # retrained: the same numbers (CPU training is deterministic)
        np.testing.assert_allclose(again[key(row)]["accuracy_eval"], row["accuracy_eval"])
        np.testing.assert_allclose(
            again[key(row)]["probe_loss_final"], row["probe_loss_final"], rtol=1e-5
        )
    config.plots, config.bootstrap_resamples = False, 100  # presentation: may change
    assert len(runner.run_study(config, resumed_dir, log=lines.append)) == len(rows)
    config.num_seeds = 3
    with pytest.raises(ValueError, match="different config"):
        runner.run_study(config, resumed_dir, log=lines.append)


def test_resume_refuses_a_repeated_row_naming_its_line(tiny_study, tmp_path):
    """A results.csv with a run's row twice (pasted from another workdir, say) is refused
    before anything trains, not kept as a sixth seed of that cell."""
    workdir, rows, _ = tiny_study
    resumed_dir = str(tmp_path / "repeated")
    os.makedirs(resumed_dir)
    shutil.copy(os.path.join(workdir, runner.CONFIG_FILE), resumed_dir)
    changed = {**rows[3], "accuracy_eval": 0.5}
    report.write_csv([*rows[:5], changed], os.path.join(resumed_dir, "results.csv"))
    message = f"{resumed_dir}/results.csv, line 7: the run of line 5"
    with pytest.raises(ValueError, match=re.escape(message)):
        runner.run_study(tiny_config(), resumed_dir, log=lambda line: None)


def test_resume_without_the_saved_config_is_refused(tiny_study, tmp_path):
    """results.csv without study_config.json: the rows' config cannot be checked, so a changed
    learning rate (or anything else) would mix two studies; the runner refuses, saying what to
    do, and leaves the results as they were."""
    _, rows, _ = tiny_study
    resumed_dir = str(tmp_path / "no_config")
    os.makedirs(resumed_dir)
    csv_path = os.path.join(resumed_dir, "results.csv")
    report.write_csv(rows[:4], csv_path)
    before = open(csv_path).read()
    config = tiny_config()
    config.lr_candidates = (0.2,)
    with pytest.raises(ValueError, match=f"{runner.CONFIG_FILE} is missing") as info:
        runner.run_study(config, resumed_dir, log=lambda line: None)
    assert "restore" in str(info.value) and "new --workdir" in str(info.value)
    assert sorted(os.listdir(resumed_dir)) == ["results.csv"]
    assert open(csv_path).read() == before


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "study"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        runner.run_study(tiny_config(), str(path), log=lambda line: None)


# ---------------------------------------------------------------- the pieces, vs references


@pytest.fixture(scope="module")
def splits():
    config = data.ClusterConfig(train_per_class=60, test_per_class=20, image_size=8)
    full = data.load("clusters", "train", config=config)
    return (
        full.subset(np.arange(500)),
        full.subset(np.arange(500, 600)),
        data.load("clusters", "test", config=config),
    )


def _study(splits):
    config = tiny_config()
    return experiment.Study(config, *splits)


def _run(norm="batch", seed=0, condition=None, steps=6):
    condition = condition or grid.Condition("skewed", "skewed", 16, skew=0.75)
    return grid.Run("clusters", "table", condition, grid.normalizer(norm), seed, steps, 0.1, 0.9)


def test_pair_metric_matches_float64_reference():
    keys = jax.random.split(jax.random.key(0), 2)
    u = {"a": jax.random.normal(keys[0], (5, 3)), "b": jnp.arange(4.0)}
    v = {"a": jax.random.normal(keys[1], (5, 3)), "b": -jnp.arange(4.0)}
    np.testing.assert_allclose(training._pair(u, v), study.update_pair(u, v), rtol=1e-5)
    assert np.isnan(training._pair(jax.tree.map(jnp.zeros_like, u), v)).all()
    np.testing.assert_allclose(training._pair(u, u), [0.0, 0.0], atol=1e-6)


def test_norm_inputs_are_ordered_by_depth():
    sown = {f"conv{i}": {"__call__": (i,)} for i in (10, 2, 0, 1)} | {"features": (7,)}
    assert training.norm_inputs(sown) == [0, 1, 2, 10]


def test_seeds_trained_together_equal_each_seed_trained_alone(splits):
    """vmap over seeds changes nothing: seed 1 in a group of two = seed 1 on its own."""
    s = _study(splits)
    together = s.train([_run(seed=0), _run(seed=1)])[1]
    alone = s.train([_run(seed=1)])[0]
    np.testing.assert_allclose(together.trace.loss, alone.trace.loss, rtol=2e-5)
    np.testing.assert_allclose(together.trace.probe_loss, alone.trace.probe_loss, rtol=2e-5)
    for a, b in zip(
        jax.tree.leaves(together.variables), jax.tree.leaves(alone.variables), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trace_and_probe_record_the_step_they_took(splits):
    """Step 0's loss and layer statistics equal a direct forward pass at the initial params,
    and the probe's first point is the initial network on the probe in evaluation mode."""
    s = _study(splits)
    run = _run(steps=3)
    compiled = s._models(run)
    rows = experiment.batch_rows(s.train_set, run)
    state = initial_state(compiled.eval_model, compiled.optimizer, s.train_set.images[:2], 0)
    images, labels = s.train_set.images[rows[0]], s.train_set.labels[rows[0]]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    logits, sown = compiled.model.apply(
        variables,
        images,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=training.is_conv_call,
    )
    conv0 = np.asarray(training.norm_inputs(sown["intermediates"])[0], np.float64)
    loss0 = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    probe_logits = compiled.eval_model.apply(variables, s._probe[0], train=False)
    probe0 = optax.softmax_cross_entropy_with_integer_labels(probe_logits, s._probe[1]).mean()
    trace = s.train([run])[0].trace
    assert trace.loss.shape == (3,) and trace.batch_means[0].shape == (3, 8)
    np.testing.assert_allclose(trace.loss[0], loss0, rtol=1e-5)
    np.testing.assert_allclose(trace.batch_means[0][0], conv0.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(trace.batch_vars[0][0], conv0.var(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(trace.probe_loss[0], probe0, rtol=1e-5)
    assert trace.probe_steps.tolist() == [0, 1, 2, 3]
    assert np.isnan(trace.grad_pair[0]).all() and np.isfinite(trace.grad_pair[1:]).all()


def test_batch_rows_follow_the_condition(splits):
    s = _study(splits)
    rows = experiment.batch_rows(s.train_set, _run(steps=100))  # more than one epoch
    assert rows.shape == (100, 16) and rows.dtype == np.int32
    dominant = [np.bincount(s.train_set.labels[r]).max() for r in rows]
    assert np.mean(dominant) >= 12  # 75% of 16 from one class, plus the filler's share


def test_population_of_layer_0_is_the_conv_outputs_statistics(splits):
    """Layer 0's input does not depend on any norm, so its population statistics must equal
    `population_stats` of the conv outputs over the whole training split (float64)."""
    for norm in ("batch", "group"):
        s = _study(splits)
        run = _run(norm)
        trained = s.train([run])[0]
        population = s._population(run, trained.variables)
        _, sown = s._models(run).eval_model.apply(
            trained.variables,
            s.train_set.images,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=training.is_conv_call,
        )
        conv0 = np.asarray(training.norm_inputs(sown["intermediates"])[0], np.float64)
        mean, var = study.population_stats(conv0)
        np.testing.assert_allclose(population[0][0], mean, atol=2e-5)
        np.testing.assert_allclose(population[0][1], var, rtol=2e-4)


def test_stability_excess_sees_composition_not_batch_size(splits):
    """One-class batches move layer 0's batch means far more than i.i.d. batches of the same
    B; uniform batches measured against uniform batches add nothing beyond noise."""
    s = _study(splits)
    one_class = grid.Condition("one", "skewed", 16, skew=1.0)
    uniform = grid.Condition("u", "uniform", 16)
    trained = s.train([_run(condition=one_class)])[0]
    population = s._population(_run(condition=one_class), trained.variables)
    skewed = s._stability(_run(condition=one_class), trained.variables, population)
    iid = s._stability(_run(condition=uniform), trained.variables, population)
    assert skewed["stability_excess_mean_l0"] > 3 * skewed["stability_iid_mean_l0"]
    assert abs(iid["stability_excess_mean_l0"]) < skewed["stability_excess_mean_l0"] / 3
