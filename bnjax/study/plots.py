"""The study's figures, drawn with matplotlib's Agg backend (no display needed).

    headline.png                held-out accuracy (eval mode), condition x normalizer, ± std
    loss_curves.png             training loss per condition, a line per normalizer (seed mean)
    batch_statistics.png        batch norm's per-step batch mean of each layer's input,
                                channel 0, in population standard deviations, per condition
    running_vs_population.png   deepest layer: running mean against the population mean per
                                channel, batch norm before and after recalibration
    accuracy_vs_batch_size.png  the sweep: accuracy against batch size per normalizer, ± std
    features_pca.png            2-D PCA of held-out penultimate features, batch norm, by class

Each function takes what `bnjax.study.runner.Artifacts` and the results rows hold and writes
one PNG; none of them computes a metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from bnjax.study.evaluation import mean_std


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(count: int, width: float = 3.6, height: float = 3.0):
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def headline(
    rows: Sequence[Mapping], labels: Mapping[str, str], path: str, chance: float | None = None
) -> str:
    """Grouped bars: mean held-out accuracy in evaluation mode, std as error bars, and a
    dotted line at `chance` (1 / classes) when given.

    `rows` are results rows (study, condition, normalizer, accuracy_eval); only the main grid's
    (study 'table') are drawn, a group of bars per condition, a bar per normalizer.

    Example:
      >>> import os, tempfile
      >>> rows = [{"study": "table", "condition": c, "normalizer": n, "accuracy_eval": a}
      ...         for c, n, a in [("uniform", "batch", 0.9), ("uniform", "group", 0.8),
      ...                         ("skewed", "batch", 0.4), ("skewed", "group", 0.8)]]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = headline(rows, {"skewed": "class-skewed"},
      ...                     os.path.join(directory, "headline.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      headline.png True
    """
    main = [r for r in rows if r["study"] == "table"]
    conditions = list(dict.fromkeys(r["condition"] for r in main))
    normalizers = list(dict.fromkeys(r["normalizer"] for r in main))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(normalizers)
    x = np.arange(len(conditions))
    for j, n in enumerate(normalizers):
        stats = [
            mean_std(
                [r["accuracy_eval"] for r in main if r["condition"] == c and r["normalizer"] == n]
            )
            for c in conditions
        ]
        offset = (j - (len(normalizers) - 1) / 2) * width
        errors = [0 if np.isnan(s.std) else s.std for s in stats]
        ax.bar(x + offset, [s.mean for s in stats], width, yerr=errors, label=n, capsize=2)
    ax.set_xticks(
        x,
        [
            labels.get(c, c).replace(" with ", "\nwith ").replace(" in ", "\nin ")
            for c in conditions
        ],
        fontsize=8,
    )
    ax.set_ylabel("held-out accuracy, eval mode")
    ax.set_ylim(0, 1.05)
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.legend(fontsize=8, ncol=3, loc="lower left")
    ax.set_title("Which normalizer survives which batch composition")
    return _save(fig, path)


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def loss_curves(
    losses: Mapping[tuple[str, str], list[np.ndarray]],
    labels: Mapping[str, str],
    path: str,
    window: int = 10,
) -> str:
    """One panel per condition, a line per normalizer: seed-mean loss, moving average.

    `losses` maps (condition, normalizer) to the (T,) loss curves of its seeds; the moving
    average over `window` steps is drawn at the window's last step (1-based).

    Example:
      >>> import os, tempfile
      >>> losses = {("uniform", "batch"): [np.linspace(2.0, 1.0, 8), np.linspace(2.2, 0.8, 8)],
      ...           ("uniform", "group"): [np.linspace(2.0, 1.2, 8)]}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = loss_curves(losses, {}, os.path.join(directory, "loss_curves.png"), window=2)
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      loss_curves.png True
    """
    conditions = list(dict.fromkeys(c for c, _ in losses))
    fig, axes = _grid(len(conditions))
    for ax, c in zip(axes, conditions, strict=True):
        for (cc, n), curves in losses.items():
            if cc == c:
                curve = np.mean(np.stack(curves), axis=0)
                mean = _smooth(curve, window)
                # Each average is drawn at its window's last step (the window may have shrunk).
                ax.plot(np.arange(len(mean)) + len(curve) - len(mean) + 1, mean, label=n, lw=1)
        ax.set_title(labels.get(c, c), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def batch_statistics(
    trajectories: Mapping[str, Sequence[np.ndarray]],
    population: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    labels: Mapping[str, str],
    path: str,
) -> str:
    """A panel per layer, a line per condition: (mu_B[t, 0] - mu_pop[0]) / sigma_pop[0].

    `trajectories` maps a condition to its per-layer (T, C) batch means mu_B, `population` to
    its per-layer (mean, var) population statistics ((C,) each); sigma_pop = sqrt(var + 1e-5).

    Example:
      >>> import os, tempfile
      >>> rng = np.random.default_rng(0)
      >>> trajectories = {"uniform": [rng.normal(size=(6, 2)) for _ in range(2)]}  # 2 layers
      >>> population = {"uniform": [(np.zeros(2), np.ones(2))] * 2}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = batch_statistics(trajectories, population, {},
      ...                             os.path.join(directory, "batch_statistics.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      batch_statistics.png True
    """
    conditions = list(trajectories)
    layers = len(next(iter(trajectories.values())))
    fig, axes = _grid(layers, width=4.2)
    for i, ax in enumerate(axes):
        for c in conditions:
            mean, var = population[c][i]
            z = (trajectories[c][i][:, 0] - mean[0]) / np.sqrt(var[0] + 1e-5)
            ax.plot(np.arange(1, len(z) + 1), z, lw=0.6, label=labels.get(c, c))
        ax.set_title(f"layer {i} input, channel 0", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("batch mean (population std)")
    axes[0].legend(fontsize=6)
    return _save(fig, path)


def running_vs_population(
    pairs: Mapping[str, Mapping[str, tuple]], labels: Mapping[str, str], path: str
) -> str:
    """Per condition: running mean vs population mean per channel (deepest layer), one marker
    per normalizer (e.g. batch before and after recalibration); the diagonal is unbiased.

    `pairs` maps a condition to {normalizer: ((running mean, running var), (population mean,
    population var))}, each (C,); both axes are in population standard deviations.

    Example:
      >>> import os, tempfile
      >>> population = (np.zeros(3), np.ones(3))
      >>> pairs = {"skewed": {"batch": ((np.array([0.5, -0.2, 1.0]), np.ones(3)), population),
      ...                     "batch+recalibration": (population, population)}}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = running_vs_population(
      ...         pairs, {}, os.path.join(directory, "running_vs_population.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      running_vs_population.png True
    """
    conditions = list(pairs)
    fig, axes = _grid(len(conditions), width=3.4, height=3.2)
    for ax, c in zip(axes, conditions, strict=True):
        lo, hi = np.inf, -np.inf
        for n, (running, population) in pairs[c].items():
            (rm, _), (pm, pv) = running, population
            x, y = pm / np.sqrt(pv + 1e-5), rm / np.sqrt(pv + 1e-5)
            ax.scatter(x, y, s=8, label=n, alpha=0.7)
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(labels.get(c, c), fontsize=8)
        ax.set_xlabel("population mean / pop. std")
        ax.set_ylabel("running mean / pop. std")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def accuracy_vs_batch_size(rows: Sequence[Mapping], path: str) -> str:
    """The sweep: mean ± std accuracy against batch size (log 2 axis), eval mode solid and
    batch statistics dashed, a colour per normalizer.

    `rows` are results rows; only the sweep's (study 'sweep': normalizer, batch_size,
    accuracy_eval, accuracy_batch_stats) are drawn.

    Example:
      >>> import os, tempfile
      >>> rows = [{"study": "sweep", "normalizer": n, "batch_size": b, "accuracy_eval": a,
      ...          "accuracy_batch_stats": a + 0.05}
      ...         for n, b, a in [("batch", 2, 0.3), ("batch", 32, 0.9), ("group", 2, 0.8),
      ...                         ("group", 32, 0.85)]]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = accuracy_vs_batch_size(
      ...         rows, os.path.join(directory, "accuracy_vs_batch_size.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      accuracy_vs_batch_size.png True
    """
    sweep = [r for r in rows if r["study"] == "sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, n in enumerate(dict.fromkeys(r["normalizer"] for r in sweep)):
        sizes = sorted({r["batch_size"] for r in sweep if r["normalizer"] == n})
        for key, style in (("accuracy_eval", "-"), ("accuracy_batch_stats", "--")):
            stats = [
                mean_std([r[key] for r in sweep if r["normalizer"] == n and r["batch_size"] == b])
                for b in sizes
            ]
            mode = "eval mode" if key == "accuracy_eval" else "batch stats"
            errors = [0 if np.isnan(s.std) else s.std for s in stats]
            ax.errorbar(
                sizes,
                [s.mean for s in stats],
                yerr=errors,
                ls=style,
                color=f"C{j}",
                marker="o",
                ms=3,
                capsize=2,
                label=f"{n} ({mode})",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy against batch size (uniform batches)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): projection on the two leading principal components.

    p = (X - mean(X)) V[:, :2], V the right singular vectors of the centered X (each column's
    sign is arbitrary). Needs N >= 2 and D >= 2 (otherwise fewer than 2 columns).

    Example:
      >>> p = pca_2d(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # points on a line
      >>> p.shape, np.abs(p[:, 0]).round(4), bool(np.allclose(p[:, 1], 0))
      ((3, 2), array([1.4142, 0.    , 1.4142]), True)
    """
    centered = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def features_pca(
    features: Mapping[str, tuple[np.ndarray, np.ndarray]],
    labels: Mapping[str, str],
    path: str,
    max_points: int = 1000,
) -> str:
    """A panel per condition: held-out features projected on their top two principal axes.

    `features` maps a condition to ((N, D) features, (N,) class labels), D >= 2; the first
    `max_points` are drawn, coloured by class.

    Example:
      >>> import os, tempfile
      >>> x = np.random.default_rng(0).normal(size=(20, 4))
      >>> features = {"uniform": (x, np.arange(20) % 2)}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = features_pca(features, {}, os.path.join(directory, "features_pca.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      features_pca.png True
    """
    conditions = list(features)
    fig, axes = _grid(len(conditions), width=3.4, height=3.2)
    for ax, c in zip(axes, conditions, strict=True):
        x, y = features[c]
        x, y = x[:max_points], y[:max_points]
        p = pca_2d(np.asarray(x, np.float64))
        ax.scatter(p[:, 0], p[:, 1], c=y, cmap="tab10", s=4, alpha=0.7)
        ax.set_title(labels.get(c, c), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
