"""The study's grid, config resolution and report writing (no training here)."""

import os
import sys

import numpy as np
import pytest

from bnjax.study import grid, report, runner

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import batch_study


def test_default_config_is_the_papers_five_conditions_in_order():
    config = batch_study.get_config()
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    assert [c.label for c in conditions] == list(grid.PAPER_LABELS.values())
    by_name = {c.name: c for c in conditions}
    assert by_name["small_batch"].batch_size < by_name["uniform"].batch_size
    assert by_name["large_inconsistent"].batch_size > by_name["uniform"].batch_size
    assert by_name["skewed"].sampler == by_name["large_inconsistent"].sampler == "skewed"
    runner.check_study_config(runner.resolve_scale(config))


def test_grid_counts_and_shared_training_runs():
    config = batch_study.get_config()
    runs = runner.make_runs(config)
    table = [r for r in runs if r.study == "table"]
    sweep = [r for r in runs if r.study == "sweep"]
    assert len(table) == 5 * len(config.normalizers) * config.num_seeds
    assert len(sweep) == len(config.sweep_batch_sizes) * len(config.sweep_normalizers) * 3
    # batch+recalibration reuses batch's training; the sweep's batch 32 reuses the uniform
    # condition (same steps and learning rate); nothing else is shared.
    keys = {r.training_key for r in runs}

    def by(name, cond):
        return [r for r in table if r.normalizer.name == name and r.condition.name == cond]

    recal = by("batch+recalibration", "skewed")[0]
    assert by("batch", "skewed")[0].training_key == recal.training_key
    assert by("batch", "skewed")[0].training_key != by("ghost_batch", "skewed")[0].training_key
    shared_sweep = [r for r in sweep if r.condition.batch_size == 32]
    assert len(keys) == len(runs) - config.num_seeds * 5 - len(shared_sweep)


def test_ghost_size_is_capped_by_the_batch():
    small = grid.Run(grid.Condition("u", "uniform", 4), grid.normalizer("ghost_batch", 8), 0)
    plain = grid.Run(grid.Condition("u", "uniform", 4), grid.normalizer("batch"), 0)
    assert small.training_key[6] == 4 and plain.training_key[6] is None


def test_sweep_sees_the_same_examples_at_every_batch_size():
    runs = [r for r in runner.make_runs(batch_study.get_config()) if r.study == "sweep"]
    config = batch_study.get_config()
    for r in runs:
        assert r.num_steps * r.condition.batch_size == config.sweep_examples
        assert r.lr_scale == r.condition.batch_size / 32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sampler": "sorted", "batch_size": 8}, "conditions.bad.sampler"),
        ({"sampler": "uniform", "batch_size": 1}, "conditions.bad.batch_size"),
        ({"sampler": "skewed", "batch_size": 8, "skew": 1.5}, "conditions.bad.skew"),
        ({"sampler": "skewed", "batch_size": 8, "groups": "colour"}, "conditions.bad.groups"),
        ({"sampler": "uniform", "batch_size": 8, "size": 3}, "unknown keys"),
    ],
)
def test_bad_conditions_name_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        grid.conditions_from_config({"bad": fields}, ["bad"])


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="run_conditions"):
        grid.conditions_from_config({"a": {"sampler": "uniform", "batch_size": 8}}, ["b"])
    with pytest.raises(ValueError, match="normalizer 'batchnorm'"):
        grid.normalizer("batchnorm")


def test_scale_full_replaces_the_listed_keys_only():
    config = batch_study.get_config()
    config.scale = "full"
    config.learning_rate = 0.01
    resolved = runner.resolve_scale(config)
    assert resolved.num_seeds == config.full.num_seeds
    assert resolved.num_steps == config.full.num_steps
    assert resolved.learning_rate == 0.01
    assert runner.resolve_scale(batch_study.get_config()).num_steps == 300
    config.full.num_step = 5
    with pytest.raises(ValueError, match=r"config\.full\.num_step"):
        runner.resolve_scale(config)
    config.scale = "huge"
    with pytest.raises(ValueError, match=r"config\.scale"):
        runner.resolve_scale(config)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_seeds", 0, "config.num_seeds"),
        ("num_steps", 10, "config.num_steps"),
        ("warmup_steps", 300, "config.warmup_steps"),
        ("stability_window", 0.0, "config.stability_window"),
        ("norm_groups", 5, "config.norm_groups"),
        ("sweep_examples", 1000, "config.sweep_examples"),
        ("normalizers", ("batch", "weight"), "normalizer 'weight'"),
        ("dataset", "imagenet", r"config.dataset='imagenet': choose one of \('clusters'"),
    ],
)
def test_bad_study_config_fails_fast(key, value, message):
    config = batch_study.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=message):
        runner.check_study_config(config)


def _rows():
    rows = []
    for seed, (acc, bias) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        common = {"study": "table", "condition": "uniform", "seed": seed, "batch_size": 32}
        metrics = {f"stability_mean_l{i}": 0.01 * (i + 1) for i in range(3)}
        metrics.update(
            stability_var_l2=0.2,
            final_loss=1.0,
            loss_oscillation=0.1,
            steps_to_target=None if seed else 40,
            gradient_noise=0.9,
            accuracy_eval=acc,
            accuracy_batch_stats=acc + 0.1,
            silhouette=0.2,
            intra_inter=0.5,
        )
        rows.append({**common, "normalizer": "batch", **metrics, "running_bias": bias})
        rows.append({**common, "normalizer": "group", **metrics, "running_bias": None})
    rows.append({**rows[0], "study": "sweep", "condition": "uniform_b2", "batch_size": 2})
    return rows


def test_table_cells_are_mean_and_std_over_seeds():
    labels = {"uniform": "Uniformly shuffled mini-batches"}
    text = report.table_markdown(_rows(), labels, title="T")
    table1 = report.table1(_rows(), "batch", labels).splitlines()
    assert "stability: batch mean, layer 2" in table1[0]
    cells = [c.strip() for c in table1[2].split("|")[1:-1]]
    assert cells[0] == "Uniformly shuffled mini-batches"
    assert cells[1] == "0.0100 ± 0.0000"
    assert cells[6] == "40 (1/2)"  # steps to target: one seed never reached it
    assert cells[7] == "0.900 ± 0.000" and cells[8] == "n/a"  # gradient / update noise
    assert cells[9] == "0.200 ± 0.141"  # running bias: mean 0.2, std sqrt(0.02)
    assert cells[10] == "0.600 ± 0.141"
    group = report.grid_table(_rows(), "running_bias", labels).splitlines()[2]
    assert group.endswith("| n/a |")
    assert "Mean ± std over 2 seeds" in text and "## Batch-size sweep" in text
    assert "| 2 | 0.500 |" in report.sweep_table(_rows(), "accuracy_eval")


def test_csv_round_trip(tmp_path):
    rows = _rows()
    path = str(tmp_path / "results.csv")
    report.write_csv(rows, path)
    back = report.read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert np.isclose(b[key], value)
            else:
                assert b[key] == value


def test_script_reports_a_bad_key_and_exits_1(tmp_path):
    """The absl entry point wires --config overrides through to the checks (fails before any
    data is loaded or any run trains)."""
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    result = subprocess.run(
        [
            sys.executable,
            "scripts/batch_study.py",
            "--config=configs/batch_study.py",
            f"--workdir={tmp_path}",
            "--config.num_seeds=0",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "error: config.num_seeds=0: must be a positive integer." in result.stderr
