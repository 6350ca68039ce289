"""The study's grid, config checks, statistics, claims and report writing (no training here)."""

import math
import os
import re
import sys

import numpy as np
import pytest
from scipy import stats

from bnjax.study import claims, grid, report, runner, significance
from bnjax.train.workdir import write_atomically

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import batch_study

RATES = {name: 0.1 for name in grid.NORMALIZERS}


def _grid(config=None):
    config = config or batch_study.get_config()
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    return config, grid.make_grid("clusters", config, RATES, conditions)


def test_default_config_has_the_papers_conditions_deconfounded():
    config = batch_study.get_config()
    conditions = grid.conditions_from_config(config.conditions, config.run_conditions)
    assert [c.label for c in conditions] == list(grid.PAPER_LABELS.values())
    by_name = {c.name: c for c in conditions}
    assert by_name["small_batch"].batch_size < by_name["uniform"].batch_size
    assert by_name["large_inconsistent"].batch_size > by_name["uniform"].batch_size
    # Large inconsistent batches differ from the class-skewed ones in B only.
    assert by_name["skewed"].skew == by_name["large_inconsistent"].skew
    assert not by_name["clustered_stream"].shuffle_batches
    assert by_name["clustered_shuffled"].shuffle_batches
    assert "none" in config.normalizers and config.num_seeds >= 5
    assert set(config.datasets) == {"clusters", "digits"}
    runner.check_study_config(config)
    runner.check_study_config(batch_study.get_config("quick"))
    with pytest.raises(ValueError, match=r"batch_study\.py:huge"):
        batch_study.get_config("huge")


def test_every_run_sees_the_same_examples_at_a_linearly_scaled_rate():
    config, runs = _grid()
    for r in runs:
        expected = config.example_budget
        if r.family == "length":
            assert r.examples in {round(expected * f) for f in config.length_fractions}
        else:
            assert r.examples // r.condition.batch_size * r.condition.batch_size == r.examples
            assert abs(r.examples - expected) < r.condition.batch_size
        assert math.isclose(r.learning_rate, 0.1 * r.condition.batch_size / 32)
    families = {r.family for r in runs}
    assert families == {"table", "dose", "momentum", "length"}


def test_shared_training_runs():
    _, runs = _grid()

    def find(family, condition, normalizer, **kw):
        return next(
            r
            for r in runs
            if (r.family, r.condition.name, r.normalizer.name, r.seed)
            == (family, condition, normalizer, 0)
            and all(getattr(r, k) == v for k, v in kw.items())
        )

    batch = find("table", "skewed", "batch")
    assert find("table", "skewed", "batch+recalibration").training_key == batch.training_key
    assert find("dose", "b32_s0.8", "batch").training_key == batch.training_key
    assert find("table", "skewed", "ghost_batch").training_key != batch.training_key
    # The momentum family changes batch norm, never a norm without running statistics.
    assert find("momentum", "skewed", "batch").training_key != batch.training_key
    group = find("table", "skewed", "group")
    assert group.group_key[-1] is None
    assert find("dose", "b32_s0.8", "group").training_key == group.training_key


@pytest.mark.parametrize("name", ["default", "quick"])
def test_grid_has_every_cell_once_with_all_seeds(name):
    """Counts per family from the config's lists, every (condition, normalizer) pair of each
    family with every seed, and no two runs with one row id (resume would skip one)."""
    config, runs = _grid(batch_study.get_config(name))
    seeds = set(range(config.num_seeds))
    conditions = list(config.run_conditions)
    expected_cells = {
        "table": {(c, n) for c in conditions for n in config.normalizers},
        "dose": {
            (f"b{b}_s{s:g}", n)
            for b in config.dose_batch_sizes
            for s in config.dose_skews
            for n in config.dose_normalizers
        },
        "momentum": {
            (c, n) for c in config.momentum_conditions for n in ("batch", "batch+recalibration")
        },
        "length": {(c, n) for c in config.length_conditions for n in config.length_normalizers},
    }
    repeats = {"momentum": len(config.other_bn_momenta), "length": len(config.length_fractions)}
    for family, cells in expected_cells.items():
        mine = [r for r in runs if r.family == family]
        assert len(mine) == len(cells) * len(seeds) * repeats.get(family, 1), family
        seen = {}
        for r in mine:
            seen.setdefault((r.condition.name, r.normalizer.name), []).append(r.seed)
        assert set(seen) == (cells if repeats.get(family, 1) else set()), family
        for cell, cell_seeds in seen.items():
            assert sorted(cell_seeds) == sorted([*seeds] * repeats.get(family, 1)), (family, cell)
    assert {r.family for r in runs} == {f for f in expected_cells if repeats.get(f, 1)}
    ids = [runner.row_id(r) for r in runs]
    assert len(set(ids)) == len(ids)
    sweep = runner.rate_sweep(config, "clusters")
    assert len({runner.row_id(r) for r in sweep + runs}) == len(sweep) + len(runs)
    assert runner.planned_runs(config) == (len(sweep) + len(runs)) * len(config.datasets)


def test_only_identical_trainings_share_a_training_run():
    """On the quick grid, the runs that share one training run are exactly: batch norm and its
    recalibrated twin of a cell, and the dose cells that are table cells (B 32 at skew 0 is
    the uniform row, at skew 0.8 the skewed row); each shared run has one seed."""
    config, runs = _grid(batch_study.get_config("quick"))
    shared = {}
    for r in runs:
        shared.setdefault(r.training_key, []).append(r)
    classes = set()
    for members in shared.values():
        assert (
            len({r.seed for r in members}) == 1 and len({r.normalizer.norm for r in members}) == 1
        )
        if len(members) > 1:
            names = frozenset((r.family, r.condition.name, r.normalizer.name) for r in members)
            classes.add((members[0].seed, names))
    recalibrated = "batch+recalibration"
    expected = set()
    for seed in range(config.num_seeds):
        for condition in ("uniform", "clustered_stream", "skewed"):
            twins = {("table", condition, "batch"), ("table", condition, recalibrated)}
            if condition in ("uniform", "skewed"):
                dose = "b32_s0" if condition == "uniform" else "b32_s0.8"
                twins.add(("dose", dose, "batch"))
                expected.add(
                    (seed, frozenset({("table", condition, "none"), ("dose", dose, "none")}))
                )
            expected.add((seed, frozenset(twins)))
    assert classes == expected
    # Seeds of one cell train together (one group), and different cells apart.
    groups = {(r.family, r.condition.name, r.normalizer.name): r.group_key for r in runs}
    assert groups[("table", "skewed", "batch")] != groups[("table", "skewed", "group")]
    assert groups[("table", "skewed", "batch")] != groups[("dose", "b8_s0.8", "batch")]
    for key in groups:
        assert (
            len(
                {
                    r.group_key
                    for r in runs
                    if (r.family, r.condition.name, r.normalizer.name) == key
                }
            )
            == 1
        )


def test_ghost_size_is_capped_by_the_batch():
    c = grid.Condition("u", "uniform", 4)
    small = grid.Run("d", "table", c, grid.normalizer("ghost_batch", 8), 0, 10, 0.1, 0.9)
    plain = grid.Run("d", "table", c, grid.normalizer("batch"), 0, 10, 0.1, 0.9)
    assert small.ghost_batch_size == 4 and plain.ghost_batch_size is None


def test_lr_sweep_and_rate_choice():
    runs = grid.lr_sweep_runs(
        "d",
        ["none", "batch", "batch+recalibration"],
        [0.03, 0.1],
        [0, 1],
        batch_size=32,
        example_budget=3200,
        bn_momentum=0.9,
    )
    assert {r.normalizer.name for r in runs} == {"none", "batch"} and len(runs) == 8
    rows = [
        {
            "dataset": "d",
            "family": "lr",
            "normalizer": "batch",
            "learning_rate": rate,
            "validation_accuracy": acc,
        }
        for rate, acc in ((0.03, 0.5), (0.03, 0.7), (0.1, 0.6), (0.1, 0.6), (0.3, 0.2))
    ]
    assert runner.choose_rates(rows, "d") == {"batch": 0.03}  # tie at 0.6: the smaller rate
    rows[0]["validation_accuracy"] = 0.4
    assert runner.choose_rates(rows, "d") == {"batch": 0.1}


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


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_seeds", 0, "config.num_seeds"),
        ("example_budget", 500, "config.example_budget"),
        ("warmup_fraction", 1.0, "config.warmup_fraction"),
        ("validation_fraction", 0.0, "config.validation_fraction"),
        ("norm_groups", 5, "config.norm_groups"),
        ("normalizers", ("batch", "weight"), "normalizer 'weight'"),
        ("datasets", ("imagenet",), r"config.datasets: 'imagenet' is not one of"),
        ("length_conditions", ("tiny",), "config.length_conditions"),
        ("dose_skews", (0.0, 2.0), "config.dose_skews"),
        ("lr_candidates", (), "config.lr_candidates"),
    ],
)
def test_bad_study_config_fails_fast(key, value, message):
    config = batch_study.get_config()
    config[key] = value
    with pytest.raises(ValueError, match=message):
        runner.check_study_config(config)


# ---------------------------------------------------------------- statistics


def test_holm_matches_the_step_down_by_hand():
    # m = 5: 5 x 0.01, 4 x 0.02, 3 x 0.03, then the running maximum keeps 0.09.
    adjusted = significance.holm([0.02, 0.05, 0.01, 0.04, 0.03])
    np.testing.assert_allclose(adjusted, [0.08, 0.09, 0.05, 0.09, 0.09])
    assert significance.holm([0.9, 0.8]) == [1.0, 1.0]


def test_welch_matches_its_formula_in_float64():
    a = np.array([0.91, 0.88, 0.93, 0.90, 0.87])
    b = np.array([0.80, 0.86, 0.78, 0.84, 0.79, 0.83])
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    assert math.isclose(significance.welch(a, b, "greater"), stats.t.sf(t, df), rel_tol=1e-9)
    assert math.isclose(significance.welch(a, b, "less"), stats.t.cdf(t, df), rel_tol=1e-9)
    assert math.isclose(significance.welch(a, b), 2 * stats.t.sf(abs(t), df), rel_tol=1e-9)
    assert math.isnan(significance.welch([1.0], b))


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [0.2, 0.5, 0.4, 0.9, 0.6]
    first = significance.bootstrap_ci(values, seed=3)
    assert first == significance.bootstrap_ci(values, seed=3)
    assert first.low < first.mean < first.high and first.n == 5
    assert math.isclose(first.mean, np.mean(values))
    # The percentile interval of the mean lies inside the data's range and narrows with n.
    wide = significance.bootstrap_ci(values * 4, seed=3)
    assert min(values) <= first.low and first.high <= max(values)
    assert wide.high - wide.low < first.high - first.low
    with pytest.raises(ValueError, match="confidence"):
        significance.bootstrap_ci(values, confidence=1.0)


def _claim_rows(gap_d1: float, gap_d2: float) -> list[dict]:
    rows = []
    for dataset, gap in (("d1", gap_d1), ("d2", gap_d2)):
        for seed in range(5):
            for condition, value in (("uniform", 0.9), ("skewed", 0.9 - gap)):
                rows.append(
                    {
                        "dataset": dataset,
                        "family": "table",
                        "condition": condition,
                        "normalizer": "batch",
                        "bn_momentum": 0.9,
                        "examples": 100,
                        "seed": seed,
                        "acc": value + 0.01 * ((seed * 7) % 5),
                    }
                )
    return rows


@pytest.mark.parametrize(
    ("gaps", "verdict"),
    [
        ((0.3, 0.3), "held"),
        ((0.3, 0.0), "held on d1"),
        ((0.0, 0.0), "not shown"),
        ((-0.3, 0.0), "reversed on d1"),
    ],
)
def test_claim_verdicts(gaps, verdict):
    claim = claims.Claim(
        "P7",
        "paper",
        "skew lowers accuracy",
        claims.Selection("acc", "skewed"),
        claims.Selection("acc", "uniform"),
        "less",
    )
    [v] = claims.verdicts(
        _claim_rows(*gaps), [claim], momentum=0.9, budgets={"d1": 100, "d2": 100}, resamples=200
    )
    assert v.verdict == verdict
    assert set(v.p_holm) == {"d1", "d2"}


def test_drop_claims_subtract_seed_by_seed():
    rows = _claim_rows(0.3, 0.3)
    drop = claims.seed_values(
        [r for r in rows if r["dataset"] == "d1"],
        claims.Selection("acc", "skewed", minus="uniform"),
        momentum=0.9,
        budget=100,
    )
    np.testing.assert_allclose(list(drop.values()), [0.3] * 5)


def test_every_study_claim_names_real_columns():
    config = batch_study.get_config()
    every = claims.study_claims(
        deepest_layer=2,
        budget=config.example_budget,
        length_fractions=config.length_fractions,
        other_momenta=config.other_bn_momenta,
    )
    columns = {key for _, key, _, _ in report.TABLE1_COLUMNS} | {
        "stability_excess_mean_l2",
        "running_bias",
        "diverged",
        "accuracy_eval",
        "probe_oscillation",
    }
    for c in every:
        for side in (c.a, c.b):
            assert side.metric in columns, c.key
            assert side.condition in config.run_conditions, c.key
            assert side.normalizer in grid.NORMALIZERS, c.key
    assert sum(c.source == "paper" for c in every) >= 15


# ---------------------------------------------------------------- report


def _rows():
    rows = []
    for seed in range(3):
        for normalizer, acc in (("batch", 0.8), ("group", 0.8), ("none", 0.4)):
            rows.append(
                {
                    "dataset": "d",
                    "family": "table",
                    "condition": "uniform",
                    "normalizer": normalizer,
                    "seed": seed,
                    "batch_size": 32,
                    "accuracy_eval": acc + 0.01 * seed,
                    "accuracy_batch_stats_train_b": acc,
                    "stability_excess_mean_l0": 0.01,
                    "stability_excess_mean_l1": 0.02,
                    "examples_to_target": None if seed else 320,
                    "running_mean_bias_l0": 0.1 if normalizer == "batch" else None,
                    "running_mean_bias_l1": 0.3 if normalizer == "batch" else None,
                    "running_bias": 0.5 if normalizer == "batch" else None,
                    "learning_rate": 0.1,
                    "bn_momentum": 0.9,
                    "examples": 3200,
                }
            )
    rows.append({**rows[0], "family": "lr", "validation_accuracy": 0.7})
    return rows


def test_table_cells_are_means_with_bootstrap_intervals_and_marks():
    labels = {"uniform": "Uniformly shuffled mini-batches"}
    text = report.table_markdown(
        _rows(), labels, {("d", "batch"): 0.1}, title="T", preamble="P", resamples=500
    )
    assert "over 3 seeds" in text and "## Columns" in text and "**0.700**" in text
    table1 = report.table1(
        [r for r in _rows() if r["normalizer"] == "batch" and r["family"] == "table"], labels, 500
    ).splitlines()
    assert "stability excess, mean, layer 1" in table1[0]
    cells = [c.strip() for c in table1[2].split("|")[1:-1]]
    assert cells[0] == "Uniformly shuffled mini-batches"
    assert cells[1] == "0.0100 [0.0100, 0.0100]"
    assert cells[7].endswith("(1/3)")  # examples to target: one seed of three reached it
    accuracy = report.accuracy_table(
        [r for r in _rows() if r["family"] == "table"], labels, "accuracy_eval", 500
    ).splitlines()[2]
    assert accuracy.count("†") == 1  # group ties batch; none differs
    assert "| 0.810 [0.80" in accuracy
    means = report.with_layer_means(_rows())[0]
    assert math.isclose(means["running_mean_bias"], 0.2)


def test_csv_round_trip(tmp_path):
    rows = _rows()
    path = str(tmp_path / "results.csv")
    report.write_csv(rows, path)
    back = report.read_csv(path)
    assert len(back) == len(rows) and not os.path.exists(path + ".tmp")
    for a, b in zip(rows, back, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert np.isclose(b[key], value)
            else:
                assert b[key] == value


def _write_lines(tmp_path, lines):
    path = str(tmp_path / "results.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


HEADER = "dataset,family,condition,normalizer,seed,learning_rate,accuracy_eval"


def test_read_csv_refuses_text_in_a_numeric_cell_naming_file_line_and_column(tmp_path):
    path = _write_lines(
        tmp_path, [HEADER, "d,table,u,batch,0,0.1,0.9", "d,table,u,batch,1,0.1,high"]
    )
    message = f"{path}, line 3, column 'accuracy_eval': 'high' is not a number"
    with pytest.raises(ValueError, match=re.escape(message)):
        report.read_csv(path)
    # A text column keeps its text; an empty numeric cell is None, not an error.
    path = _write_lines(tmp_path, [HEADER, "d,table,u,batch,0,0.1,"])
    assert report.read_csv(path)[0]["accuracy_eval"] is None


@pytest.mark.parametrize(
    "line, problem",
    [
        ("garbage", "1 cells where the header has 7"),
        ("d,table,u,batch,0,0.1,0.9,extra", "8 cells where the header has 7"),
    ],
)
def test_read_csv_refuses_a_garbage_line(tmp_path, line, problem):
    path = _write_lines(tmp_path, [HEADER, "d,table,u,batch,0,0.1,0.9", line])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 3: {problem}")):
        report.read_csv(path)


@pytest.mark.parametrize(
    "second, kind",
    [("d,table,u,batch,0,0.1,0.9", "an exact copy"), ("d,table,u,batch,0,0.1,0.5", "")],
)
def test_read_csv_refuses_a_repeated_run(tmp_path, second, kind):
    """Two rows of one run are refused, an exact copy too: which one a resume should keep is
    the user's call, and a copy usually means the file was assembled by hand."""
    lines = [HEADER, "d,table,u,batch,0,0.1,0.9", "d,table,u,batch,1,0.1,0.9", second]
    path = _write_lines(tmp_path, lines)
    key = lambda row: (row["condition"], row["normalizer"], row["seed"])  # noqa: E731
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 4: the run of line 2")) as info:
        report.read_csv(path, key=key)
    assert kind in str(info.value)
    assert len(report.read_csv(path)) == 3  # without a key, rows are not compared


def test_read_csv_requires_the_key_columns(tmp_path):
    path = _write_lines(tmp_path, [HEADER, "d,table,u,batch,,0.1,0.9"])
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2, column 'seed': empty")):
        report.read_csv(path, required=("seed",))
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column 'examples'")):
        report.read_csv(path, required=("examples",))


def test_writes_are_atomic_and_synced(tmp_path, monkeypatch):
    """A failed write (here: the sync fails, as on a full disk) leaves the old file whole."""
    path = str(tmp_path / "study_config.json")
    write_atomically(path, "old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, "new")
    with pytest.raises(OSError, match="No space"):
        report.write_csv(_rows(), str(tmp_path / "results.csv"))
    assert open(path).read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["study_config.json"]


def _script(*args):
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    command = [sys.executable, "scripts/batch_study.py", "--config=configs/batch_study.py:quick"]
    return subprocess.run([*command, *args], cwd=root, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "case, message",
    [
        ("--config.num_seeds=0", "error: config.num_seeds=0: must be a positive integer."),
        ("--config.foo=1", "error: --config.foo is not a config key of the study; the keys are"),
    ],
)
def test_script_reports_a_usage_error_in_one_line_and_exits_2(tmp_path, case, message):
    """The absl entry point wires --config overrides through to the checks (fails before any
    data is loaded or any run trains): one `error:` line, no traceback, exit 2."""
    result = _script(f"--workdir={tmp_path}", case)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
