"""The study's figures, drawn with matplotlib's Agg backend (no display needed).

    headline.png            test accuracy (evaluation mode), condition x normalizer, a panel
                            per dataset; bars = mean over seeds, error bars = 95% bootstrap
                            interval; dotted line = chance
    dose_response.png       test accuracy against skew, a panel per (dataset, B), a line per
                            normalizer, 95% interval bars
    probe_curves.png        held-out probe loss against training examples, batch norm, a line
                            per condition (mean over seeds, shaded 95% interval), per dataset
    running_bias.png        batch norm's running-statistics bias by layer: mean part and
                            variance part, a line per condition, 95% interval bars
    stability_by_layer.png  stability excess of the batch means by layer, a line per condition,
                            a panel per (dataset, normalizer)
    batch_statistics.png    batch norm's per-step batch mean of channel 0 at layer 0 and the
                            deepest layer, in population std from the population mean
    features_pca.png        2-D PCA of the test set's penultimate features (batch norm, seed 0),
                            coloured by class

Every axis is labelled with its quantity and unit and every panel says which normalizer and
layer it shows. Each function takes results rows or saved artifacts and writes one PNG; none
computes a metric (intervals: `bnjax.study.significance.bootstrap_ci`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from bnjax.study.significance import bootstrap_ci

_RESAMPLES = 2000  # intervals for drawing; table.md's use the config's resamples


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(count: int, width: float = 3.6, height: float = 3.0, cols: int = 3):
    cols = max(1, min(count, cols))
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _ordered(rows, key):
    return list(dict.fromkeys(r[key] for r in rows))


def _interval(values) -> tuple[float, float, float]:
    """(mean, lower error, upper error) for matplotlib's yerr (0 errors when undefined)."""
    ci = bootstrap_ci(values, resamples=_RESAMPLES)
    if ci.n == 0:
        return np.nan, 0.0, 0.0
    return ci.mean, ci.mean - ci.low, ci.high - ci.mean


def headline(
    rows: Sequence[Mapping],
    labels: Mapping[str, str],
    path: str,
    chance: Mapping[str, float] | None = None,
) -> str:
    """Grouped bars per dataset: mean test accuracy in evaluation mode (family 'table'), a
    group per condition, a bar per normalizer, 95% bootstrap intervals, chance dotted.

    Example:
      >>> import os, tempfile
      >>> rows = [{"dataset": "d", "family": "table", "condition": c, "normalizer": n,
      ...          "accuracy_eval": a}
      ...         for c, n, a in [("uniform", "batch", 0.9), ("uniform", "none", 0.8),
      ...                         ("skewed", "batch", 0.4), ("skewed", "none", 0.8)]]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = headline(rows, {"skewed": "class-skewed"},
      ...                     os.path.join(directory, "headline.png"), chance={"d": 0.1})
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      headline.png True
    """
    main = [r for r in rows if r["family"] == "table"]
    datasets = _ordered(main, "dataset")
    normalizers = _ordered(main, "normalizer")  # one colour per normalizer in every panel
    fig, axes = plt.subplots(len(datasets), 1, figsize=(12, 4.0 * len(datasets)), squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        mine = [r for r in main if r["dataset"] == dataset]
        conditions = _ordered(mine, "condition")
        width = 0.8 / len(normalizers)
        x = np.arange(len(conditions))
        for j, n in enumerate(normalizers):
            stats = [
                _interval(
                    [
                        r["accuracy_eval"]
                        for r in mine
                        if r["condition"] == c and r["normalizer"] == n
                    ]
                )
                for c in conditions
            ]
            offset = (j - (len(normalizers) - 1) / 2) * width
            ax.bar(
                x + offset,
                [s[0] for s in stats],
                width,
                yerr=np.array([[s[1] for s in stats], [s[2] for s in stats]]),
                label=n,
                color=f"C{j}",
                capsize=2,
            )
        ax.set_xticks(
            x,
            [
                labels.get(c, c).replace(" with ", "\nwith ").replace(" in ", "\nin ")
                for c in conditions
            ],
            fontsize=7,
        )
        ax.set_ylabel("test accuracy, eval mode")
        ax.set_ylim(0, 1.3)  # headroom for the legend above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        if chance and dataset in chance:
            ax.axhline(chance[dataset], color="grey", lw=0.8, ls=":", label="chance")
        ax.legend(fontsize=7, ncol=len(normalizers) + 1, loc="upper center")
        ax.set_title(
            f"{dataset}: test accuracy by batch composition and normalizer "
            "(bars: mean over seeds; error bars: 95% bootstrap interval)",
            fontsize=9,
        )
    return _save(fig, path)


def dose_response(rows: Sequence[Mapping], path: str) -> str:
    """Panels per (dataset, B): test accuracy (evaluation mode) against skew, a line per
    normalizer (family 'dose'), 95% interval bars. Returns "" without dose rows.

    Example:
      >>> import os, tempfile
      >>> rows = [{"dataset": "d", "family": "dose", "normalizer": n, "batch_size": 32,
      ...          "skew": s, "accuracy_eval": 0.9 - s * (n == "batch")}
      ...         for n in ("batch", "none") for s in (0.0, 0.5, 0.8)]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = dose_response(rows, os.path.join(directory, "dose_response.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      dose_response.png True
    """
    dose = [r for r in rows if r["family"] == "dose"]
    if not dose:
        return ""
    panels = [
        (d, b)
        for d in _ordered(dose, "dataset")
        for b in sorted({r["batch_size"] for r in dose if r["dataset"] == d})
    ]
    normalizers = _ordered(dose, "normalizer")  # one colour per normalizer in every panel
    fig, axes = _grid(len(panels), width=3.8, height=3.2)
    for ax, (d, b) in zip(axes, panels, strict=True):
        mine = [r for r in dose if r["dataset"] == d and r["batch_size"] == b]
        for j, n in enumerate(normalizers):
            if not any(r["normalizer"] == n for r in mine):
                continue
            skews = sorted({r["skew"] for r in mine if r["normalizer"] == n})
            stats = [
                _interval(
                    [r["accuracy_eval"] for r in mine if r["normalizer"] == n and r["skew"] == s]
                )
                for s in skews
            ]
            ax.errorbar(
                skews,
                [s[0] for s in stats],
                yerr=np.array([[s[1] for s in stats], [s[2] for s in stats]]),
                marker="o",
                ms=3,
                capsize=2,
                label=n,
                color=f"C{j}",
            )
        ax.set_title(f"{d}, B = {b}", fontsize=9)
        ax.set_xlabel("skew (share of each batch from one class)")
        ax.set_ylabel("test accuracy, eval mode")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, title="normalizer (95% CI bars)", title_fontsize=7)
    return _save(fig, path)


def probe_curves(
    curves: Mapping[tuple[str, str, str], Sequence[tuple[np.ndarray, np.ndarray]]],
    labels: Mapping[str, str],
    path: str,
    normalizer: str = "batch",
) -> str:
    """Held-out probe loss against training examples for `normalizer`, a panel per dataset, a
    line per condition: the mean over seeds and a shaded 95% interval.

    `curves[(dataset, condition, normalizer)]` lists each seed's (examples (P,), loss (P,)).

    Example:
      >>> import os, tempfile
      >>> steps = np.array([0, 100, 200])
      >>> curves = {("d", "u", "batch"): [(steps, np.array([2.3, 1.0, 0.5]))] * 2}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = probe_curves(curves, {}, os.path.join(directory, "probe_curves.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      probe_curves.png True
    """
    datasets = list(dict.fromkeys(d for d, _, n in curves if n == normalizer))
    conditions = list(dict.fromkeys(c for _, c, n in curves if n == normalizer))
    fig, axes = _grid(max(1, len(datasets)), width=5.0, height=3.6, cols=2)
    for ax, d in zip(axes, datasets, strict=False):
        for j, c in enumerate(conditions):  # condition j has colour Cj in every panel
            if (d, c, normalizer) not in curves:
                continue
            seeds = curves[(d, c, normalizer)]
            x = seeds[0][0]
            losses = np.stack([loss for _, loss in seeds])
            stats = [_interval(losses[:, i]) for i in range(losses.shape[1])]
            mean = np.array([s[0] for s in stats])
            ax.plot(x, mean, lw=1.0, label=labels.get(c, c), color=f"C{j}")
            ax.fill_between(
                x,
                mean - [s[1] for s in stats],
                mean + [s[2] for s in stats],
                alpha=0.2,
                color=f"C{j}",
            )
        ax.set_title(f"{d}: {normalizer}, fixed held-out probe (eval mode)", fontsize=9)
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("probe cross-entropy (nats)")
        ax.legend(fontsize=6, title="condition (shade: 95% CI)", title_fontsize=6)
    return _save(fig, path)


def _by_layer(ax, rows, key_prefix: str, labels, conditions):
    layers = sorted(
        {
            int(k[len(key_prefix) :])
            for r in rows
            for k in r
            if k.startswith(key_prefix) and k[len(key_prefix) :].isdigit()
        }
    )
    # `conditions` is the figure's whole list: condition j has colour Cj in every panel.
    for j, c in enumerate(conditions):
        if not any(r["condition"] == c for r in rows):
            continue
        stats = [
            _interval([r.get(f"{key_prefix}{i}") for r in rows if r["condition"] == c])
            for i in layers
        ]
        ax.errorbar(
            layers,
            [s[0] for s in stats],
            yerr=np.array([[s[1] for s in stats], [s[2] for s in stats]]),
            marker="o",
            ms=3,
            capsize=2,
            label=labels.get(c, c),
            color=f"C{j}",
        )
    ax.set_xticks(layers)
    ax.set_xlabel("normalized layer (depth)")


def running_bias_by_layer(rows: Sequence[Mapping], labels: Mapping[str, str], path: str) -> str:
    """Batch norm (family 'table'), a row of two panels per dataset: the running mean's bias
    (population std) and the running variance's (|log std ratio|) by layer, a line per
    condition, 95% interval bars.

    Example:
      >>> import os, tempfile
      >>> rows = [{"dataset": "d", "family": "table", "normalizer": "batch", "condition": c,
      ...          "running_mean_bias_l0": 0.1, "running_mean_bias_l1": 0.2 + (c == "s"),
      ...          "running_var_bias_l0": 0.05, "running_var_bias_l1": 0.1} for c in "us"]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = running_bias_by_layer(rows, {}, os.path.join(directory, "rb.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      rb.png True
    """
    bn = [r for r in rows if r["family"] == "table" and r["normalizer"] == "batch"]
    datasets, conditions = _ordered(bn, "dataset"), _ordered(bn, "condition")
    fig, axes = _grid(2 * len(datasets), width=4.6, height=3.4, cols=2)
    for k, d in enumerate(datasets):
        mine = [r for r in bn if r["dataset"] == d]
        for j, (part, unit) in enumerate(
            (("mean", "population std"), ("var", "|log(running std / population std)|"))
        ):
            ax = axes[2 * k + j]
            _by_layer(ax, mine, f"running_{part}_bias_l", labels, conditions)
            ax.set_ylabel(f"running {part} bias ({unit})", fontsize=8)
            ax.set_title(f"{d}: batch norm, running {part} vs population", fontsize=9)
    axes[0].legend(fontsize=6, title="condition (95% CI bars)", title_fontsize=6)
    return _save(fig, path)


def stability_by_layer(rows: Sequence[Mapping], labels: Mapping[str, str], path: str) -> str:
    """Stability excess of the batch means by layer (family 'table'), a panel per (dataset,
    normalizer in batch / group / none), a line per condition, 95% interval bars.

    Example:
      >>> import os, tempfile
      >>> rows = [{"dataset": "d", "family": "table", "normalizer": "batch", "condition": c,
      ...          "stability_excess_mean_l0": 0.1 * (c == "s"), "stability_excess_mean_l1": 0.0}
      ...         for c in "us"]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = stability_by_layer(rows, {}, os.path.join(directory, "st.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      st.png True
    """
    main = [r for r in rows if r["family"] == "table"]
    panels = [
        (d, n)
        for d in _ordered(main, "dataset")
        for n in ("batch", "group", "none")
        if any(r["dataset"] == d and r["normalizer"] == n for r in main)
    ]
    fig, axes = _grid(len(panels), width=4.0, height=3.2)
    for ax, (d, n) in zip(axes, panels, strict=True):
        mine = [r for r in main if r["dataset"] == d and r["normalizer"] == n]
        _by_layer(ax, mine, "stability_excess_mean_l", labels, _ordered(main, "condition"))
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel("batch-mean variance beyond i.i.d.\n(population variances)", fontsize=7)
        ax.set_title(f"{d}: {n}", fontsize=9)
    axes[0].legend(fontsize=6, title="condition (95% CI bars)", title_fontsize=6)
    return _save(fig, path)


def batch_statistics(
    firsts: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    labels: Mapping[str, str],
    path: str,
) -> str:
    """Batch norm, seed 0: (mu_B[t, 0] - mu_pop[0]) / sigma_pop[0] per training step at layer 0
    and the deepest layer, a line per condition, a panel per (dataset, layer).

    `firsts[(dataset, condition)]` holds 'trajectory_first'/'trajectory_deep' ((T', C') batch
    means, every 4th step) and 'population_first'/'population_deep' ((2, C') mean and var).

    Example:
      >>> import os, tempfile
      >>> art = {"trajectory_first": np.zeros((5, 2)), "trajectory_deep": np.ones((5, 2)),
      ...        "population_first": np.array([[0.0, 0.0], [1.0, 1.0]]),
      ...        "population_deep": np.array([[0.0, 0.0], [1.0, 1.0]])}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = batch_statistics({("d", "u"): art}, {}, os.path.join(directory, "b.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      b.png True
    """
    datasets = list(dict.fromkeys(d for d, _ in firsts))
    conditions = list(dict.fromkeys(c for _, c in firsts))  # condition j: colour Cj
    fig, axes = _grid(2 * len(datasets), width=5.0, height=3.2, cols=2)
    for k, d in enumerate(datasets):
        for j, layer in enumerate(("first", "deep")):
            ax = axes[2 * k + j]
            for (dd, c), art in firsts.items():
                if dd != d:
                    continue
                color = f"C{conditions.index(c)}"
                mean, var = art[f"population_{layer}"]
                z = (art[f"trajectory_{layer}"][:, 0] - mean[0]) / np.sqrt(var[0] + 1e-5)
                ax.plot(np.arange(len(z)) * 4, z, lw=0.6, label=labels.get(c, c), color=color)
            ax.set_title(
                f"{d}: batch norm, {'layer 0' if layer == 'first' else 'deepest layer'}"
                " input, channel 0 (seed 0)",
                fontsize=8,
            )
            ax.set_xlabel("training step")
            ax.set_ylabel("batch mean - population mean\n(population std)", fontsize=7)
    axes[0].legend(fontsize=6, title="condition", title_fontsize=6)
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
    firsts: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    labels: Mapping[str, str],
    path: str,
) -> str:
    """A panel per (dataset, condition): batch norm's test features (seed 0, evaluation mode)
    on their top two principal axes, coloured by class.

    Example:
      >>> import os, tempfile
      >>> x = np.random.default_rng(0).normal(size=(20, 4))
      >>> firsts = {("d", "u"): {"features": x, "labels": np.arange(20) % 2}}
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = features_pca(firsts, {}, os.path.join(directory, "features_pca.png"))
      ...     print(os.path.basename(path), os.path.getsize(path) > 0)
      features_pca.png True
    """
    keys = list(firsts)
    fig, axes = _grid(len(keys), width=3.4, height=3.2)
    for ax, (d, c) in zip(axes, keys, strict=True):
        art = firsts[(d, c)]
        p = pca_2d(np.asarray(art["features"], np.float64))
        scatter = ax.scatter(p[:, 0], p[:, 1], c=art["labels"], cmap="tab10", s=4, alpha=0.7)
        ax.set_title(f"{d}: batch norm, {labels.get(c, c)}", fontsize=7)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_xticks([])
        ax.set_yticks([])
    if keys:
        axes[0].legend(
            *scatter.legend_elements(), fontsize=5, title="class", title_fontsize=5, loc="best"
        )
    return _save(fig, path)
