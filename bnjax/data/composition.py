"""Measure what a batch order does: per-batch group counts, dominance, skew, temporal runs.

All functions take an epoch's order (num_batches, batch_size) of indices and `groups` (N,)
(class labels or sub-cluster ids) and are plain NumPy. They are the measured side of the
samplers' settings (tests check one against the other) and a study's description of a run.

Example:
  >>> labels = np.repeat(np.arange(2), 4)
  >>> order = np.array([[0, 1, 2, 4], [3, 5, 6, 7]])
  >>> top_share(order, labels).tolist()
  [0.75, 0.75]
"""

from __future__ import annotations

import numpy as np


def _dense(groups) -> tuple[np.ndarray, int]:
    values, dense = np.unique(np.asarray(groups), return_inverse=True)
    return dense.reshape(-1), len(values)


def group_counts(order: np.ndarray, groups) -> np.ndarray:
    """(num_batches, G) examples of each group in each batch; columns follow the sorted
    distinct values of `groups`."""
    dense, num_groups = _dense(groups)
    batch_groups = dense[np.asarray(order)]
    rows = np.repeat(np.arange(batch_groups.shape[0]), batch_groups.shape[1])
    counts = np.zeros((batch_groups.shape[0], num_groups), np.int64)
    np.add.at(counts, (rows, batch_groups.ravel()), 1)
    return counts


def top_share(order: np.ndarray, groups, num_top: int = 1) -> np.ndarray:
    """(num_batches,) fraction of each batch that belongs to its `num_top` most frequent
    groups. 1.0 for a batch of one group; about `num_top / G` plus sampling noise for a
    uniform batch over G equal groups."""
    counts = np.sort(group_counts(order, groups), axis=1)[:, ::-1]
    return counts[:, :num_top].sum(1) / np.asarray(order).shape[1]


def estimate_skew(order: np.ndarray, groups, num_dominant: int = 1) -> float:
    """The skew that explains an order: the mean over batches of (T - P) / (1 - P), where T is
    the batch's share of its `num_dominant` most frequent groups and P is those groups' share of
    the whole dataset. It inverts `SkewedSampler`'s definition (T = skew + (1 - skew) P in
    expectation), is 1 for single-group batches and near 0 for uniform batches (slightly
    positive: the most frequent group of a uniform batch is above its share by chance)."""
    dense, num_groups = _dense(groups)
    population = np.bincount(dense, minlength=num_groups) / len(dense)
    counts = group_counts(order, groups)
    top = np.argsort(-counts, axis=1, kind="stable")[:, :num_dominant]
    share = np.take_along_axis(counts, top, 1).sum(1) / counts.sum(1)
    expected = population[top].sum(1)
    if np.any(expected >= 1):
        raise ValueError("estimate_skew needs more groups than num_dominant.")
    return float(np.mean((share - expected) / (1 - expected)))


def proportion_error(order: np.ndarray, groups) -> float:
    """max over batches and groups of |count - batch_size * n_g / N|: how far from exactly
    stratified the batches are (`BalancedSampler` keeps it below 2)."""
    dense, num_groups = _dense(groups)
    population = np.bincount(dense, minlength=num_groups) / len(dense)
    counts = group_counts(order, groups)
    return float(np.max(np.abs(counts - np.asarray(order).shape[1] * population)))


def repeat_rate(order: np.ndarray, groups) -> float:
    """Fraction of consecutive batch pairs whose most frequent group is the same: near 1 for
    a clustered stream (long runs of one group), near 1/G for independently ordered batches.
    This is what tells `ClusteredSampler` from `ClusteredSampler(shuffle_batches=True)`."""
    majority = np.argmax(group_counts(order, groups), axis=1)
    if len(majority) < 2:
        return float("nan")
    return float(np.mean(majority[1:] == majority[:-1]))


def describe(order: np.ndarray, groups, num_dominant: int = 1) -> dict[str, float]:
    """The statistics above in one dict, for logs and study tables."""
    return {
        "top_share": float(np.mean(top_share(order, groups, num_dominant))),
        "skew": estimate_skew(order, groups, num_dominant),
        "proportion_error": proportion_error(order, groups),
        "repeat_rate": repeat_rate(order, groups),
    }
