"""The study end to end on a tiny grid, and its training/measurement pieces against references."""

import math
import os
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

NUM_STEPS = 24


def tiny_config():
    config = batch_study.get_config()
    config.num_seeds = 2
    config.num_steps = NUM_STEPS
    config.warmup_steps = 4
    config.model_features = (8, 16)
    config.run_conditions = ("uniform", "skewed")
    config.normalizers = ("batch", "group", "batch+recalibration")
    config.sweep_batch_sizes = (2, 32)
    config.sweep_normalizers = ("batch",)
    config.sweep_examples = NUM_STEPS * 32  # batch 2: 384 steps; batch 32: the uniform run
    config.eval_batch_size = 1000
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
    "final_loss": (0, math.inf),
    "loss_oscillation": (0, math.inf),
    "gradient_noise": (0, 2),
    "update_noise": (0, 2),
    "accuracy_eval": (0, 1),
    "accuracy_batch_stats": (0, 1),
    "accuracy_gap": (-1, 1),
    "train_accuracy": (0, 1),
    "silhouette": (-1, 1),
    "intra_inter": (0, math.inf),
    "train_seconds": (0, math.inf),
}
OPTIONAL = {"steps_to_target": (1, NUM_STEPS * 16), "running_bias": (0, math.inf)}


def test_tiny_grid_writes_every_output(tiny_study):
    workdir, rows, lines = tiny_study
    # 2 conditions x 3 normalizers x 2 seeds + 2 batch sizes x 1 normalizer x 2 seeds
    assert len(rows) == 12 + 4
    assert report.read_csv(os.path.join(workdir, "results.csv"))[0].keys() == rows[0].keys()
    table = open(os.path.join(workdir, "table.md")).read()
    assert "## Table 1 with numbers: batch" in table
    assert grid.PAPER_LABELS["skewed"] in table and " ± " in table
    for name in (
        "headline",
        "loss_curves",
        "batch_statistics",
        "running_vs_population",
        "accuracy_vs_batch_size",
        "features_pca",
    ):
        with open(os.path.join(workdir, "plots", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert lines[-1].startswith("study finished: 16 runs (10 trained)")


def test_every_metric_is_finite_and_in_range(tiny_study):
    _, rows, _ = tiny_study
    for row in rows:
        layers = [k for k in row if k.startswith("stability_")]
        assert len(layers) == 2 * 2  # mean and var, two norm layers
        for key in layers:
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        for key, (low, high) in RANGES.items():
            assert math.isfinite(row[key]) and low <= row[key] <= high, (key, row[key])
        for key, (low, high) in OPTIONAL.items():
            assert row[key] is None or low <= row[key] <= high, (key, row[key])
        assert (row["running_bias"] is None) == (row["normalizer"] == "group")


def test_normalizer_specific_facts(tiny_study):
    _, rows, _ = tiny_study
    by = {(r["study"], r["condition"], r["normalizer"], r["seed"]): r for r in rows}
    for seed in (0, 1):
        for condition in ("uniform", "skewed"):
            g = by[("table", condition, "group", seed)]
            assert g["accuracy_gap"] == 0.0  # per-example statistics: both modes agree
            bn = by[("table", condition, "batch", seed)]
            recal = by[("table", condition, "batch+recalibration", seed)]
            # One training run: identical training-time columns...
            for key in ("final_loss", "gradient_noise", "stability_mean_l1", "train_accuracy"):
                assert recal[key] == bn[key]
            # ...and precise statistics sit much closer to the population than the EMA.
            assert recal["running_bias"] < 0.5 * bn["running_bias"]
            assert recal["accuracy_batch_stats"] == bn["accuracy_batch_stats"]
        # The sweep's batch-32 run is the uniform condition's run.
        sweep = by[("sweep", "uniform_b32", "batch", seed)]
        assert sweep["accuracy_eval"] == by[("table", "uniform", "batch", seed)]["accuracy_eval"]


# ---------------------------------------------------------------- the pieces, vs references


@pytest.fixture(scope="module")
def clusters():
    config = data.ClusterConfig(train_per_class=60, test_per_class=20)
    return (
        data.load("clusters", "train", config=config),
        data.load("clusters", "test", config=config),
    )


def _study(clusters, norm="batch"):
    config = tiny_config()
    config.eval_batch_size = 200
    config.recalibration_batch_size = 50
    train, test = clusters
    run = grid.Run(grid.Condition("skewed", "skewed", 16, skew=0.75), grid.normalizer(norm), 0)
    return experiment.Study(config, train, test), run


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


def test_trace_records_the_step_it_took(clusters):
    """Step 0's loss and layer statistics equal a direct forward pass at the initial params."""
    s, run = _study(clusters)
    compiled = s._models(run)
    model, eval_model, trainer, optimizer = (
        compiled.model,
        compiled.eval_model,
        compiled.trainer,
        compiled.optimizer,
    )
    rows = experiment.batch_rows(s.train_set, run, 3)
    state = initial_state(eval_model, optimizer, s.train_set.images[:2], 0)
    images, labels = s.train_set.images[rows[0]], s.train_set.labels[rows[0]]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    logits, sown = model.apply(
        variables,
        images,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=training.is_conv_call,
    )
    conv0 = np.asarray(training.norm_inputs(sown["intermediates"])[0], np.float64)
    loss0 = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    _, record = trainer(jax.tree.map(jnp.copy, state), s._images, s._labels, rows)
    trace = training.to_trace(record)
    assert trace.loss.shape == (3,) and trace.batch_means[0].shape == (3, 8)
    np.testing.assert_allclose(trace.loss[0], loss0, rtol=1e-5)
    np.testing.assert_allclose(trace.batch_means[0][0], conv0.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(trace.batch_vars[0][0], conv0.var(axis=(0, 1, 2)), rtol=1e-4)
    assert np.isnan(trace.grad_pair[0]).all() and np.isfinite(trace.grad_pair[1:]).all()


def test_batch_rows_follow_the_condition(clusters):
    s, run = _study(clusters)
    rows = experiment.batch_rows(s.train_set, run, 100)  # more than one epoch (37 batches)
    assert rows.shape == (100, 16) and rows.dtype == np.int32
    dominant = [np.bincount(s.train_set.labels[r]).max() for r in rows]
    assert np.mean(dominant) >= 12  # 75% of 16 from one class, plus the filler's share


def test_population_of_layer_0_is_the_conv_outputs_statistics(clusters):
    """Batch norm's population statistics come from full-batch recalibration; layer 0's input
    does not depend on any norm, so they must equal `population_stats` of its conv outputs."""
    for norm in ("batch", "group"):
        s, run = _study(clusters, norm)
        trained = s.train(run)
        population = s._population(run, trained.variables)
        eval_model = s._models(run).eval_model
        _, sown = eval_model.apply(
            trained.variables,
            s.train_set.images,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=training.is_conv_call,
        )
        conv0 = training.norm_inputs(sown["intermediates"])[0]
        mean, var = study.population_stats(conv0)
        np.testing.assert_allclose(population[0][0], mean, atol=2e-5)
        np.testing.assert_allclose(population[0][1], var, rtol=2e-4)
