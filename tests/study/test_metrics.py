"""The study's metric functions, each on a case with a known answer."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import study

# ---------------------------------------------------------------- BN statistical stability


@pytest.mark.parametrize("method", ["variance", "successive"])
def test_constant_trajectory_has_zero_variability(method):
    means = np.tile([0.3, -2.0, 5.0], (20, 1))
    out = study.batch_stat_variability(
        means, np.tile([1.0, 2.0, 3.0], (20, 1)), population_var=[1.0, 2.0, 3.0], method=method
    )
    assert out == {"mean_variability": 0.0, "var_variability": 0.0}


def test_trajectory_variance_known_values():
    s = np.array([[1.0, 2.0], [3.0, 2.0]])  # channel 0: var 1, successive 2^2 / 2; channel 1: 0
    assert study.trajectory_variance(s) == 0.5
    assert study.trajectory_variance(s, method="successive") == 1.0
    assert study.trajectory_variance(s, scale=[2.0, 1.0]) == 0.125


def test_successive_method_ignores_a_slow_trend():
    t = np.arange(101.0)[:, None]  # a pure trend: variance (T^2 - 1) / 12, successive 1 / 2
    assert study.trajectory_variance(t) == pytest.approx(850.0)
    assert study.trajectory_variance(t, method="successive") == pytest.approx(0.5)


def test_normalized_variability_known_values():
    mu = np.array([[0.0, 1.0], [2.0, 1.0]])  # Var_t = [1, 0]
    var = np.array([[2.0, 1.0], [6.0, 1.0]])  # Var_t(var / pop) = [0.25, 0]
    out = study.batch_stat_variability(mu, var, population_var=[4.0, 1.0], epsilon=0.0)
    assert out == {"mean_variability": 0.125, "var_variability": 0.125}


def test_normalized_mean_variability_is_one_over_batch_size_for_iid_batches():
    rng = np.random.default_rng(0)
    batch = 32
    x = 5.0 + 2.0 * rng.standard_normal((2000, batch, 3))
    out = study.batch_stat_variability(
        x.mean(axis=1), x.var(axis=1), population_var=np.full(3, 4.0), epsilon=0.0
    )
    assert out["mean_variability"] == pytest.approx(1 / batch, rel=0.1)
    assert out["var_variability"] == pytest.approx(2 / (batch - 1), rel=0.15)  # Var(chi2)


def test_class_skewed_batches_are_less_stable_than_shuffled():
    rng = np.random.default_rng(1)
    centers = np.array([-3.0, 3.0])
    shuffled = centers[rng.integers(0, 2, (500, 16))] + rng.standard_normal((500, 16))
    skewed = centers[rng.integers(0, 2, (500, 1))] + rng.standard_normal((500, 16))
    pop_var = [shuffled.var()]
    a = study.batch_stat_variability(shuffled.mean(1, keepdims=True), population_var=pop_var)
    b = study.batch_stat_variability(skewed.mean(1, keepdims=True), population_var=pop_var)
    assert b["mean_variability"] > 10 * a["mean_variability"]


# ---------------------------------------------------------------- convergence


def test_total_variation_of_an_alternating_loss():
    losses = [1.0, 0.0, 1.0, 0.0, 1.0]
    assert study.loss_oscillation(losses) == 4.0
    assert study.loss_oscillation(losses, per_step=True) == 1.0
    assert study.loss_oscillation(losses, excess=True) == 4.0  # same end points
    assert study.loss_oscillation(losses, window=2) == 0.0  # smoothed: 0.5 everywhere


def test_excess_total_variation():
    assert study.loss_oscillation([3.0, 1.0, 2.0, 0.0]) == 5.0
    assert study.loss_oscillation([3.0, 1.0, 2.0, 0.0], excess=True) == 2.0
    assert study.loss_oscillation(np.linspace(2.0, 0.1, 50), excess=True) == pytest.approx(0.0)


def test_smooth_and_final_loss():
    np.testing.assert_allclose(study.smooth([1.0, 2.0, 3.0, 6.0], 2), [1.5, 2.5, 4.5])
    np.testing.assert_array_equal(study.smooth([1.0, 2.0], 1), [1.0, 2.0])
    assert study.final_loss([5.0, 4.0, 3.0, 2.0, 1.0], k=2) == 1.5
    assert study.final_loss([5.0, 4.0, 3.0, 2.0, 1.0], k=100) == 3.0


def test_steps_to_target_on_a_known_curve():
    losses = 1.0 / (1.0 + np.arange(10.0))  # 1, 1/2, 1/3, ...: first <= 0.2 at index 4
    assert study.steps_to_target(losses, 0.2) == 4.0
    assert study.steps_to_target(losses, 0.2, steps=50 * np.arange(1, 11)) == 250.0
    # window 2: (1/4 + 1/5) / 2 = 0.225 > 0.2, (1/5 + 1/6) / 2 = 0.183 <= 0.2 -> ends at index 5
    assert study.steps_to_target(losses, 0.2, window=2) == 5.0
    assert study.steps_to_target(losses, 0.0) is None
    assert study.steps_to_target([np.nan, np.nan, 0.1], 0.5) == 2.0  # NaN never counts


def test_diverged_losses_propagate():
    assert math.isnan(study.final_loss([1.0, np.nan]))
    assert study.loss_oscillation([1.0, np.inf, 2.0]) == np.inf
    assert math.isnan(study.loss_oscillation([1.0, np.nan, 2.0]))


# ---------------------------------------------------------------- gradient noise


def test_identical_updates_have_zero_noise_opposite_ones_the_max():
    u = np.array([1.0, -2.0, 0.5])
    assert study.update_noise(np.tile(u, (5, 1))) == {"cosine_noise": 0.0, "relative_change": 0.0}
    flips = np.stack([u, -3 * u, u, -0.5 * u])
    out = study.update_noise(flips)
    assert out["cosine_noise"] == pytest.approx(2.0)
    assert out["relative_change"] == pytest.approx(1.0)


def test_orthogonal_updates():
    out = study.update_noise(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert out["cosine_noise"] == pytest.approx(1.0)
    assert out["relative_change"] == pytest.approx(1 / math.sqrt(2))


def test_pytree_updates_are_flattened():
    tree = {"w": np.arange(4.0).reshape(2, 2), "b": np.array([1.0, -1.0])}
    scaled = {k: 2 * v for k, v in tree.items()}  # same direction, twice the norm
    out = study.update_noise([tree, scaled])
    assert out["cosine_noise"] == pytest.approx(0.0)
    assert out["relative_change"] == pytest.approx(1 / 3)  # |2u - u| / (|u| + |2u|)
    jax_tree = {k: jnp.asarray(v) for k, v in tree.items()}
    assert study.update_pair(jax_tree, tree) == (0.0, 0.0)


def test_zero_updates_are_skipped():
    u = np.array([1.0, 2.0])
    assert study.update_noise([u, u, np.zeros(2)])["cosine_noise"] == 0.0
    out = study.update_noise([u, np.zeros(2), u])
    assert math.isnan(out["cosine_noise"]) and math.isnan(out["relative_change"])


# ---------------------------------------------------------------- running-statistics bias


def test_running_stats_equal_to_population_have_zero_bias():
    mean, var = np.array([0.1, -3.0]), np.array([0.5, 9.0])
    out = study.running_stat_bias(mean, var, mean, var)
    assert out == {"mean_bias": 0.0, "scale_bias": 0.0, "bias": 0.0}


def test_known_shift_gives_exact_bias():
    pop_mean, pop_var = np.array([0.0, 1.0]), np.array([1.0, 4.0])
    run_mean = pop_mean + 0.5 * np.sqrt(pop_var)  # half a standard deviation off
    run_var = 4 * pop_var  # sigma twice as large: |log 2|
    out = study.running_stat_bias(run_mean, run_var, pop_mean, pop_var, epsilon=0.0)
    assert out["mean_bias"] == pytest.approx(0.5, abs=1e-15)
    assert out["scale_bias"] == pytest.approx(math.log(2), abs=1e-15)
    assert out["bias"] == pytest.approx(0.5 + math.log(2), abs=1e-15)
    shrunk = study.running_stat_bias(pop_mean, pop_var / 4, pop_mean, pop_var, epsilon=0.0)
    assert shrunk["scale_bias"] == pytest.approx(math.log(2))  # symmetric in the log


def test_population_stats_whole_and_in_chunks():
    rng = np.random.default_rng(2)
    x = (1000.0 + rng.standard_normal((64, 4, 4, 3))).astype(np.float32)  # NHWC, large offset
    want_mean = x.astype(np.float64).mean(axis=(0, 1, 2))
    want_var = x.astype(np.float64).var(axis=(0, 1, 2))
    for got in (study.population_stats(x), study.population_stats([x[:10], x[10:11], x[11:]])):
        np.testing.assert_allclose(got[0], want_mean, rtol=1e-12)
        np.testing.assert_allclose(got[1], want_var, rtol=1e-9)
    nchw = study.population_stats(np.moveaxis(x, -1, 1), axis=1)
    np.testing.assert_allclose(nchw[1], want_var, rtol=1e-9)


# ---------------------------------------------------------------- inference accuracy


def test_accuracy_and_gap():
    labels = np.array([0, 1, 2, 1])
    logits = np.eye(3)[[0, 1, 0, 0]]  # 2 of 4 right
    assert study.accuracy(logits, labels) == 0.5
    assert study.accuracy(jnp.asarray([0, 1, 2, 1]), labels) == 1.0
    out = study.accuracy_gap(logits, labels, labels)
    assert out == {"accuracy_eval": 0.5, "accuracy_batch_stats": 1.0, "gap": 0.5}


# ---------------------------------------------------------------- representation coherence


def _clusters(spread, n_per=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = 100.0 * np.eye(3, 8)
    labels = np.repeat(np.arange(3), n_per)
    return centers[labels] + spread * rng.standard_normal((len(labels), 8)), labels


def test_tight_separated_clusters():
    x, y = _clusters(spread=0.01)
    assert study.silhouette(x, y) > 0.99
    assert study.intra_inter_ratio(x, y)["ratio"] < 1e-3


def test_random_labels():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 8))
    y = rng.integers(0, 3, 600)
    assert abs(study.silhouette(x, y)) < 0.05
    assert study.intra_inter_ratio(x, y)["ratio"] > 5


def test_silhouette_exact_small_case():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    # point 0: a = 1, b = 10.5; point 1: a = 1, b = 9.5; the others mirror these
    assert study.silhouette(x, y) == pytest.approx((9.5 / 10.5 + 8.5 / 9.5) / 2)


def test_silhouette_subsample_is_deterministic():
    x, y = _clusters(spread=50.0, n_per=400)
    a = study.silhouette(x, y, max_samples=300, seed=1)
    assert a == study.silhouette(x, y, max_samples=300, seed=1)
    assert a == pytest.approx(study.silhouette(x, y, max_samples=None), abs=0.05)


def test_intra_inter_ratio_exact():
    x = np.array([[-1.0], [1.0], [9.0], [11.0], [19.0], [21.0]])  # centroids 0, 10, 20
    out = study.intra_inter_ratio(x, np.array([5, 5, 7, 7, 9, 9]))
    assert out["intra"] == 1.0
    assert out["inter"] == pytest.approx(40 / 3)  # pairs 10, 20, 10
    assert out["ratio"] == pytest.approx(3 / 40)


# ---------------------------------------------------------------- mean ± std over seeds


def test_mean_std_of_known_numbers():
    s = study.mean_std([1.0, 2.0, 3.0])
    assert s == study.Summary(2.0, 1.0, 3, 3)
    assert study.format_mean_std(s) == "2.000 ± 1.000"
    assert study.format_mean_std(study.mean_std([0.1, 0.2])) == "0.150 ± 0.071"
    assert study.format_mean_std(study.mean_std([0.5])) == "0.500"
    assert study.format_mean_std(study.mean_std([1.0, None, 3.0])) == "2.000 ± 1.414 (2/3)"
    assert study.format_mean_std(study.mean_std([None, np.nan])) == "n/a (0/2)"
    assert study.format_mean_std(study.mean_std([100.0, 200.0]), ".0f") == "150 ± 71"


def test_summarize_rows():
    rows = [
        {"condition": "shuffled", "seed": 0, "loss": 0.1, "steps": 100.0},
        {"condition": "shuffled", "seed": 1, "loss": 0.3, "steps": None},
        {"condition": "shuffled", "seed": 2, "loss": 0.2},
    ]
    out = study.summarize(rows)
    assert list(out) == ["seed", "loss", "steps"]  # the string column is left out
    assert out["loss"].mean == pytest.approx(0.2) and out["loss"].std == pytest.approx(0.1)
    assert out["steps"] == (100.0, out["steps"].std, 1, 3)
    table = study.format_summary(rows, ["loss", "steps"], fmt={"steps": ".0f"})
    assert table == {"loss": "0.200 ± 0.100", "steps": "100 (1/3)"}


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: study.trajectory_variance(np.zeros(5)), "trajectory: expected a 2-D"),
        (lambda: study.trajectory_variance(np.zeros((0, 3))), "trajectory: needs"),
        (lambda: study.trajectory_variance(np.zeros((1, 3)), method="successive"), "trajectory"),
        (lambda: study.trajectory_variance(np.zeros((4, 3)), method="std"), "method"),
        (lambda: study.trajectory_variance(np.zeros((4, 3)), scale=[1.0, 2.0]), "scale"),
        (lambda: study.batch_stat_variability(np.zeros((4, 3)), np.zeros((4, 2))), "batch_vars"),
        (
            lambda: study.batch_stat_variability(np.zeros((4, 3)), population_var=[1.0]),
            "population_var",
        ),
        (lambda: study.final_loss([]), "losses"),
        (lambda: study.final_loss([1.0], k=0), "k:"),
        (lambda: study.loss_oscillation([1.0]), "losses"),
        (lambda: study.loss_oscillation([1.0, 2.0], window=3), "window"),
        (lambda: study.steps_to_target([1.0, 0.5], 0.6, steps=[1, 2, 3]), "steps"),
        (lambda: study.update_noise(np.zeros((1, 4))), "updates"),
        (lambda: study.update_noise([np.ones(2)]), "updates"),
        (lambda: study.update_noise([np.ones(2), np.ones(3)]), "previous"),
        (lambda: study.update_pair({}, np.ones(2)), "previous: empty"),
        (lambda: study.running_stat_bias([0.0], [1.0], [0.0, 0.0], [1.0]), "population_mean"),
        (lambda: study.running_stat_bias([], [], [], []), "running_mean"),
        (lambda: study.population_stats([]), "x: empty"),
        (lambda: study.population_stats([np.ones((2, 3)), np.ones((2, 4))]), "x: chunk 1"),
        (lambda: study.accuracy(np.zeros((3, 2)), [0, 1]), "shape mismatch"),
        (lambda: study.accuracy([0, 1], []), "labels"),
        (lambda: study.accuracy(np.zeros((2, 2, 2)), [0, 1]), "predictions"),
        (lambda: study.silhouette(np.zeros((4, 2)), [0, 0, 0, 0]), "labels: need at least 2"),
        (lambda: study.silhouette(np.zeros((4, 2)), [0, 1, 2, 3]), "labels: silhouette"),
        (lambda: study.intra_inter_ratio(np.zeros((4, 2)), [0, 1]), "labels: expected shape"),
        (lambda: study.intra_inter_ratio(np.zeros(4), [0, 1, 0, 1]), "features"),
        (lambda: study.mean_std([]), "values: empty"),
        (lambda: study.summarize([]), "rows: empty"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
