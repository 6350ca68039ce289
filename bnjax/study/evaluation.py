"""The batch-composition study's held-out metrics and the mean +- std summary.

Continues `bnjax.study.metrics` (same conventions: NumPy/JAX arrays in, float64 inside, Python
floats out, ValueError naming the argument).

    column                       function                   larger value means
    inference accuracy           accuracy, accuracy_gap     (gap > 0: running stats hurt)
    representation coherence     silhouette                 better separated classes
                                 intra_inter_ratio          looser / overlapping classes
    table cells                  summarize, format_mean_std "0.123 ± 0.004" over seeds
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np

from bnjax.study.metrics import _array

__all__ = [
    "Summary",
    "accuracy",
    "accuracy_gap",
    "format_mean_std",
    "format_summary",
    "intra_inter_ratio",
    "mean_std",
    "silhouette",
    "summarize",
]


# ---------------------------------------------------------------- inference accuracy


def accuracy(predictions, labels) -> float:
    """Fraction of argmax(logits) == label: `predictions` (N, K) logits or (N,) class ids.

    Example:
      >>> accuracy([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [1, 0, 0])  # logits: 2 of 3 right
      0.6666666666666666
      >>> accuracy([2, 0, 1, 1], [2, 0, 1, 0])  # class ids
      0.75
    """
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array, got shape {y.shape}")
    if p.ndim == 2:
        p = np.argmax(p, axis=-1)
    elif p.ndim != 1:
        raise ValueError(f"predictions: expected (N, K) logits or (N,) ids, got shape {p.shape}")
    if p.shape != y.shape:
        raise ValueError(f"shape mismatch: predictions give {p.shape}, labels {y.shape}")
    return float(np.mean(p == y))


def accuracy_gap(eval_predictions, batch_predictions, labels) -> dict[str, float]:
    """Accuracy in evaluation mode (running stats), with batch statistics, and the gap.

    gap = accuracy_batch_stats - accuracy_eval: > 0 when the running statistics cost accuracy
    that the batch's own statistics would have had; ~0 when they are unbiased.

    Example:
      >>> accuracy_gap([0, 1, 0, 1], [0, 1, 1, 0], labels=[0, 1, 1, 0])
      {'accuracy_eval': 0.5, 'accuracy_batch_stats': 1.0, 'gap': 0.5}
    """
    a_eval = accuracy(eval_predictions, labels)
    a_batch = accuracy(batch_predictions, labels)
    return {"accuracy_eval": a_eval, "accuracy_batch_stats": a_batch, "gap": a_batch - a_eval}


# ---------------------------------------------------------------- representation coherence


def _features_labels(features, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _array(features, "features", 2)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},) to match features, got {y.shape}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"labels: need at least 2 classes, got {len(classes)}")
    return x, y, classes


def silhouette(features, labels, *, max_samples: int | None = 2000, seed: int = 0) -> float:
    """Mean silhouette (Euclidean) of (N, D) features under their (N,) class labels.

    s_i = (b_i - a_i) / max(a_i, b_i), a_i = mean distance to the other points of its class,
    b_i = smallest mean distance to the points of another class; sklearn's silhouette_score.
    When N > max_samples, on a subsample of max_samples points drawn without replacement
    with `seed` (deterministic). In [-1, 1]: ~1 tight separated classes, ~0 overlapping,
    < 0 points closer to another class. Needs 2 <= classes <= n - 1 in the (sub)sample.

    Example:
      >>> features = [[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]]
      >>> round(silhouette(features, [0, 0, 1, 1]), 4)  # a = 1, b = (10 + sqrt(101)) / 2
      0.9002
      >>> round(silhouette(features, [0, 1, 0, 1]), 4)  # mixed: a = 10, b = (1 + sqrt(101)) / 2
      -0.4475
    """
    from sklearn.metrics import silhouette_score

    x, y, _ = _features_labels(features, labels)
    if max_samples is not None and len(x) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_samples, replace=False))
        x, y = x[keep], y[keep]
    n_classes = len(np.unique(y))
    if not 2 <= n_classes <= len(x) - 1:
        raise ValueError(f"labels: silhouette needs 2..{len(x) - 1} classes, got {n_classes}")
    return float(silhouette_score(x, y, metric="euclidean"))


def intra_inter_ratio(features, labels) -> dict[str, float]:
    """Intra-class spread over inter-class separation of (N, D) features, (N,) labels.

    With class centroids m_k = mean of the features of class k (K >= 2 classes):
      intra = mean_i |x_i - m_{y_i}|                 (over all N points: size-weighted)
      inter = mean_{k < l} |m_k - m_l|                (over the K (K - 1) / 2 class pairs)
      ratio = intra / inter
    Euclidean norms; scale-invariant. 0 = every class collapsed to a point; larger = looser
    and more overlapping classes (grows without bound as centroids coincide; inf when they do).

    Example:
      >>> features = [[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]]
      >>> intra_inter_ratio(features, [0, 0, 1, 1])  # centroids (0, 1) and (4, 1)
      {'intra': 1.0, 'inter': 4.0, 'ratio': 0.25}
    """
    x, y, classes = _features_labels(features, labels)
    centroids = np.stack([x[y == k].mean(axis=0) for k in classes])
    index = np.searchsorted(classes, y)
    intra = float(np.mean(np.linalg.norm(x - centroids[index], axis=1)))
    iu = np.triu_indices(len(classes), k=1)
    gaps = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=-1)[iu]
    inter = float(np.mean(gaps))
    return {"intra": intra, "inter": inter, "ratio": intra / inter if inter > 0 else math.inf}


# ---------------------------------------------------------------- mean ± std over seeds


class Summary(NamedTuple):
    """mean and sample standard deviation (ddof 1; NaN when n < 2) of the n finite values
    among `total` (None, NaN and inf are missing: a diverged run or a target never reached).

    Example:
      >>> s = mean_std([1.0, 3.0, None])
      >>> s.mean, s.std, f"{s.n}/{s.total} finite"
      (2.0, 1.4142135623730951, '2/3 finite')
    """

    mean: float
    std: float
    n: int
    total: int


def mean_std(values: Sequence) -> Summary:
    """`Summary` of a sequence of numbers (None allowed, counted as missing).

    Example:
      >>> mean_std([1.0, 3.0, float("nan")])
      Summary(mean=2.0, std=1.4142135623730951, n=2, total=3)
      >>> mean_std([0.5])  # one value: no sample standard deviation
      Summary(mean=0.5, std=nan, n=1, total=1)
    """
    values = list(values)
    if not values:
        raise ValueError("values: empty")
    x = np.array([math.nan if v is None else float(v) for v in values], np.float64)
    x = x[np.isfinite(x)]
    mean = float(np.mean(x)) if len(x) else math.nan
    std = float(np.std(x, ddof=1)) if len(x) >= 2 else math.nan
    return Summary(mean, std, len(x), len(values))


def format_mean_std(summary: Summary, fmt: str = ".3f") -> str:
    """ "0.123 ± 0.004"; "0.123" for one value; " (2/3)" appended when values were missing;
    "n/a (0/3)" when none was finite.

    Example:
      >>> format_mean_std(mean_std([1.0, 2.0, 3.0]))
      '2.000 ± 1.000'
      >>> format_mean_std(mean_std([0.5, float("nan"), None]), ".2f")
      '0.50 (1/3)'
      >>> format_mean_std(mean_std([None, None]))
      'n/a (0/2)'
    """
    mean, std, n, total = summary
    if n == 0:
        return f"n/a (0/{total})"
    text = f"{mean:{fmt}}" if n < 2 else f"{mean:{fmt}} ± {std:{fmt}}"
    return text if n == total else f"{text} ({n}/{total})"


def _is_number(v) -> bool:
    return v is None or isinstance(v, Real | np.number)


def summarize(rows: Sequence[Mapping], keys: Sequence[str] | None = None) -> dict[str, Summary]:
    """Per key, the `Summary` over rows (e.g. one dict of metrics per seed).

    keys=None takes every key, in first-seen order, whose values are all numbers or None (so
    "condition", "normalizer" strings are left out). A row without a key counts as missing.

    Example:
      >>> rows = [{"condition": "uniform", "loss": 1.0, "steps": 100},
      ...         {"condition": "uniform", "loss": 3.0, "steps": None}]
      >>> summary = summarize(rows)  # "condition" holds strings: left out
      >>> list(summary)
      ['loss', 'steps']
      >>> summary["steps"]
      Summary(mean=100.0, std=nan, n=1, total=2)
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows: empty")
    if keys is None:
        seen = dict.fromkeys(k for row in rows for k in row)
        keys = [k for k in seen if all(_is_number(row.get(k)) for row in rows)]
    return {k: mean_std([row.get(k) for row in rows]) for k in keys}


def format_summary(
    rows: Sequence[Mapping], keys: Sequence[str] | None = None, fmt: str | Mapping = ".3f"
) -> dict[str, str]:
    """`summarize` then `format_mean_std`; `fmt` one format spec or a {key: spec} mapping
    (keys it lacks use ".3f").

    Example:
      >>> rows = [{"condition": "uniform", "loss": 1.0, "steps": 100},
      ...         {"condition": "uniform", "loss": 3.0, "steps": None}]
      >>> format_summary(rows, fmt={"steps": ".0f"})
      {'loss': '2.000 ± 1.414', 'steps': '100 (1/2)'}
    """
    out = {}
    for k, s in summarize(rows, keys).items():
        spec = fmt.get(k, ".3f") if isinstance(fmt, Mapping) else fmt
        out[k] = format_mean_std(s, spec)
    return out
