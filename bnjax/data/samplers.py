"""Batch-composition samplers: the study's lever. Each one orders an epoch's indices into batches.

A sampler is a frozen description (sizes, groups, seed); `sampler.epoch(e)` returns that
epoch's global batches as an int64 array of shape `(num_batches, batch_size)`, a pure function
of `(seed, e)`: the same on every host and every run (with the same NumPy version: the orders
come from `numpy.random.default_rng([seed, e, kind])`), different from epoch to epoch.

Common guarantees (each tested):
- `num_batches = num_examples // batch_size`; the `num_examples % batch_size` left-over
  examples are dropped for that epoch (which ones depends on the sampler and the epoch).
- No index repeats within an epoch: the rows together are a permutation of a subset of size
  `num_batches * batch_size` of `range(num_examples)`.

The four orders ("groups" are the class labels, or the sub-cluster ids for feature skew):

- `UniformSampler`: each batch a uniform draw without replacement; batches independent.
- `ClusteredSampler`: each batch one group (two where a group ends), and consecutive batches
  the same group until it is used up: a non-stationary stream. `shuffle_batches=True` keeps
  the one-group batches but puts them in a random order.
- `SkewedSampler`: `round(skew * batch_size)` examples of each batch from its
  `num_dominant` dominant groups, the rest uniform; batches in a random order.
- `BalancedSampler`: every group in every batch in proportion to its size (stratified: the
  floor or the ceil of batch_size * group share); batches in a random order.

`bnjax.data.sharding.shard` cuts each global batch into per-process blocks for many hosts.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools

import numpy as np

_SALT = {"uniform": 11, "clustered": 13, "skewed": 17, "balanced": 19}


def _rng(seed: int, epoch: int, kind: str) -> np.random.Generator:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got {seed}, {epoch}.")
    return np.random.default_rng([seed, epoch, _SALT[kind]])


def _as_groups(groups) -> tuple[np.ndarray, int]:
    """Dense group ids 0..G-1 (G = number of distinct values) from any (N,) integer array."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be a 1-D integer array, got {groups.dtype} {groups.shape}.")
    values, dense = np.unique(groups, return_inverse=True)
    return dense.reshape(-1), len(values)


def _group_sorted(rng: np.random.Generator, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """All indices as a stream: groups one after another in a random order, members shuffled."""
    rank = rng.permutation(num_groups)[groups]
    order = rng.permutation(len(groups))
    return order[np.argsort(rank[order], kind="stable")]


def _run_positions(stream_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (0, 1, ... per run)."""
    starts = np.flatnonzero(np.r_[True, stream_groups[1:] != stream_groups[:-1]])
    lengths = np.diff(np.r_[starts, len(stream_groups)])
    return np.arange(len(stream_groups)) - np.repeat(starts, lengths)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class BatchSampler(abc.ABC):
    """Base: `epoch(e)` -> (num_batches, batch_size) int64 indices into the dataset.

    Subclasses provide `num_examples` and `epoch`; all arguments are keyword-only.

    Example (a sampler of your own):
      >>> @dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
      ... class InOrder(BatchSampler):                       # dataset order, every epoch
      ...     num_examples: int
      ...     def epoch(self, epoch):
      ...         return np.arange(self.num_batches * self.batch_size).reshape(self.num_batches, -1)
      >>> sampler = InOrder(num_examples=7, batch_size=3)
      >>> sampler.num_batches, sampler.epoch(0).tolist()        # the left-over example dropped
      (2, [[0, 1, 2], [3, 4, 5]])
    """

    batch_size: int
    seed: int = 0

    @property
    def num_batches(self) -> int:
        """Batches per epoch: num_examples // batch_size (the remainder is dropped)."""
        return self.num_examples // self.batch_size

    def _check_batch_size(self) -> None:
        if not 1 <= self.batch_size <= self.num_examples:
            raise ValueError(
                f"batch_size must be in [1, num_examples={self.num_examples}], "
                f"got {self.batch_size}."
            )

    @abc.abstractmethod
    def epoch(self, epoch: int) -> np.ndarray:
        """The global batches of epoch `epoch`: (num_batches, batch_size) int64."""


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class UniformSampler(BatchSampler):
    """Uniformly shuffled batches: a fresh random permutation each epoch, cut into batches.

    Example:
      >>> UniformSampler(num_examples=10, batch_size=3, seed=0).epoch(0).shape
      (3, 3)
    """

    num_examples: int

    def __post_init__(self):
        self._check_batch_size()

    def epoch(self, epoch: int) -> np.ndarray:
        order = _rng(self.seed, epoch, "uniform").permutation(self.num_examples)
        return order[: self.num_batches * self.batch_size].reshape(self.num_batches, -1)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class _GroupedSampler(BatchSampler):
    """A sampler over `groups` (N,): class labels, or sub-cluster ids for feature skew. Any
    integer ids; they are renumbered 0..num_groups-1 internally."""

    groups: np.ndarray

    def __post_init__(self):
        dense, num_groups = _as_groups(self.groups)
        object.__setattr__(self, "_dense", dense)
        object.__setattr__(self, "num_groups", num_groups)
        self._check_batch_size()

    @property
    def num_examples(self) -> int:
        return len(self._dense)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ClusteredSampler(_GroupedSampler):
    """Clustered batches: the epoch is a stream that visits the groups one at a time.

    The groups come in a random order (new each epoch), each group's members shuffled; the
    stream is cut into batches, so consecutive batches hold the same group until it is used up.
    Every batch holds a single group except at most `num_groups - 1` batches that straddle the
    end of one group and the start of the next (more where a group has fewer than
    `batch_size` members). The tail of the last group (`num_examples % batch_size`) is dropped.

    `shuffle_batches=True` shuffles the batches of that stream: each batch is still (nearly)
    one group, but consecutive batches come from different groups (pure batches, i.i.d. order).

    Example:
      >>> labels = np.repeat(np.arange(3), 4)                   # 3 classes of 4
      >>> order = ClusteredSampler(batch_size=2, groups=labels, seed=0).epoch(1)
      >>> labels[order].tolist()
      [[2, 2], [2, 2], [1, 1], [1, 1], [0, 0], [0, 0]]
    """

    shuffle_batches: bool = False

    def epoch(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, epoch, "clustered")
        stream = _group_sorted(rng, self._dense, self.num_groups)
        batches = stream[: self.num_batches * self.batch_size].reshape(self.num_batches, -1)
        return batches[rng.permutation(self.num_batches)] if self.shuffle_batches else batches


def _apportion(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integers q_g <= caps[g], proportional to `weights` (largest remainders, ties by group
    id), summing to min(total, sum(caps)): groups that hit their cap keep it and the rest is
    shared again among the others."""
    quota = np.zeros(len(weights), np.int64)
    while (share := total - quota.sum()) > 0 and (free := quota < caps).any():
        exact = share * weights * free / (weights * free).sum()
        extra = np.floor(exact).astype(np.int64)
        by_remainder = np.lexsort((np.arange(len(weights)), -(exact - extra)))
        extra[by_remainder[: share - extra.sum()]] += 1
        quota = np.minimum(quota + extra, caps)  # each pass ends, or saturates another group
    return quota


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SkewedSampler(_GroupedSampler):
    """Skewed batches: a fraction `skew` of every batch comes from its dominant group(s).

    Definition, with B = batch_size, m = num_dominant and k = round(skew * B): each batch holds
    k "dominant" examples in m chunks (sizes as equal as possible), each chunk from one group
    and the m chunks from m distinct groups, plus B - k "filler" examples drawn uniformly
    without replacement from everything no chunk took. Over an epoch each group fills a number
    of chunks proportional to its size, so every group is dominant equally often per member;
    the batches come in a random order, and each batch's rows are shuffled so that any block
    of rows (a process's shard) has the batch's composition in expectation.

    Hence skew=0 is `UniformSampler`'s distribution and skew=1, m=1 is
    `ClusteredSampler(shuffle_batches=True)`'s. With G equal-sized groups the expected share
    of a batch's m most frequent groups is skew + (1 - skew) * m / G;
    `bnjax.data.composition.estimate_skew` inverts it from an epoch's order.

    Exact up to two boundary cases, both rare for sizable groups: a group fills at most
    floor(|group| / ceil(k / m)) chunks, and the chunks no group can fill alone (only when the
    groups are small against k, e.g. skew near 1) take the largest left-overs, so they hold
    two or three groups; and a batch's m chunks come from distinct groups unless one group
    holds more than 1/m of the data. So the realized skew falls short of the setting when
    groups are small against the batch (e.g. groups of 700, batches of 200, skew 1: 5 of 35
    batches hold two groups, measured skew 0.92); measure it with `estimate_skew` and log it.

    Example:
      >>> labels = np.repeat(np.arange(4), 250)
      >>> order = SkewedSampler(batch_size=100, groups=labels, skew=0.6, seed=0).epoch(0)
      >>> [int(np.bincount(labels[row]).max()) for row in order]        # 60 + about 10
      [71, 66, 67, 73, 68, 71, 66, 66, 63, 67]
    """

    skew: float = 0.5
    num_dominant: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}.")
        if not 1 <= self.num_dominant <= self.num_groups:
            raise ValueError(
                f"num_dominant must be in [1, number of groups={self.num_groups}], "
                f"got {self.num_dominant}."
            )

    @property
    def dominant_per_batch(self) -> int:
        """k = round(skew * batch_size): dominant examples per batch."""
        return round(self.skew * self.batch_size)

    def epoch(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, epoch, "skewed")
        nb, k, m = self.num_batches, self.dominant_per_batch, self.num_dominant
        chunk_sizes = np.array([k // m + (j < k % m) for j in range(m)])  # per region j
        sizes = np.bincount(self._dense, minlength=self.num_groups)
        # Chunks per group, in proportion to group size, and never more than its members fill.
        chunks = _apportion(nb * m, sizes, sizes // max(chunk_sizes.max(), 1))
        stream = _group_sorted(rng, self._dense, self.num_groups)
        stream_groups = self._dense[stream]
        # Slot s (chunk b of region j = s // nb) has size chunk_sizes[j]; pure chunks fill the
        # slots in the stream's group order, so group g uses the first used[g] of its run.
        slot_sizes = np.repeat(chunk_sizes, nb)
        run_order = stream_groups[np.flatnonzero(np.r_[True, np.diff(stream_groups) != 0])]
        slot_groups = np.repeat(run_order, chunks[run_order])
        used = np.bincount(
            slot_groups, weights=slot_sizes[: len(slot_groups)], minlength=self.num_groups
        ).astype(np.int64)
        is_pure = _run_positions(stream_groups) < used[stream_groups]
        # Slots no group can fill alone take the left-overs, largest left-over group first, so
        # they are as close to one group as the epoch allows.
        rest = stream[~is_pure]
        rest = rest[np.argsort(used[self._dense[rest]] - sizes[self._dense[rest]], kind="stable")]
        mixed = slot_sizes[len(slot_groups) :].sum()
        dominant = np.concatenate([stream[is_pure], rest[:mixed]])
        filler = rng.permutation(rest[mixed:])
        bounds = np.cumsum(np.r_[0, nb * chunk_sizes])
        parts = [dominant[a:b].reshape(nb, -1) for a, b in itertools.pairwise(bounds)]
        parts.append(filler[: nb * (self.batch_size - k)].reshape(nb, -1))
        batches = rng.permuted(np.concatenate(parts, axis=1), axis=1)
        return batches[rng.permutation(nb)]


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class BalancedSampler(_GroupedSampler):
    """Balanced (stratified) batches: every batch holds every group in proportion to its size.

    With q_g = B * n_g / N (group g of n_g members, N examples, B = batch_size), every batch
    holds floor(q_g) or ceil(q_g) members of group g: exactly proportional up to rounding.
    Which groups get their ceil in which batch is chosen by systematic sampling: the fractional
    parts f_g = q_g - floor(q_g) (they sum to an integer r) are laid end to end in a random
    group order, and batch b takes the r groups under the points (b + u) / nb + j, j < r
    (nb = num_batches, u ~ U[0, 1)). So each group gets its ceil in floor or ceil of nb * f_g
    batches, and never uses more than its n_g members over the epoch.

    Members are shuffled within each group, and interleaved within each batch (by the key
    (i + v_g) / count_g), so any contiguous block of a batch's rows (a process's shard) is
    stratified too, within ±2. The batches come in a random order; the dropped examples are
    random members of each group.

    Example:
      >>> labels = np.repeat(np.arange(3), [20, 20, 40])
      >>> order = BalancedSampler(batch_size=8, groups=labels, seed=0).epoch(0)
      >>> np.bincount(labels[order[0]]).tolist()
      [2, 2, 4]
    """

    def epoch(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, epoch, "balanced")
        nb, batch_size, total = self.num_batches, self.batch_size, self.num_examples
        sizes = np.bincount(self._dense, minlength=self.num_groups)
        base, remainder = np.divmod(batch_size * sizes, total)  # q_g = base + remainder / N
        extra = batch_size - base.sum()  # r: groups per batch that get one more
        # Systematic sampling in integers (units of 1 / (N * nb)): interval of group g has
        # length nb * remainder_g; batch b's points are j * N * nb + b * N + offset.
        group_order = rng.permutation(self.num_groups)
        ends = np.cumsum(nb * remainder[group_order])
        points = (
            np.arange(extra)[None, :] * total * nb
            + np.arange(nb)[:, None] * total
            + rng.integers(total)
        )
        counts = np.tile(base, (nb, 1))  # (nb, G)
        hit = group_order[np.searchsorted(ends, points, side="right")]
        np.add.at(counts, (np.repeat(np.arange(nb), extra), hit.ravel()), 1)
        # Give each group's shuffled members to the batches in turn, count by count.
        stream = _group_sorted(rng, self._dense, self.num_groups)
        stream_groups = self._dense[stream]
        position = _run_positions(stream_groups)
        cumulative = np.cumsum(counts, axis=0)  # (nb, G)
        # batch of a member = how many batches' cumulative counts of its group it has passed:
        # one searchsorted over all groups, each group's column shifted past the previous one.
        shift = (total + 1) * np.arange(self.num_groups)
        flat = (cumulative + shift).T.ravel()
        batch = np.searchsorted(flat, position + shift[stream_groups], "right")
        batch -= nb * stream_groups
        kept = batch < nb  # members past the group's total are this epoch's dropped ones
        stream, stream_groups, batch = stream[kept], stream_groups[kept], batch[kept]
        # Interleave the groups inside each batch: member i of count c gets key (i + v_g) / c.
        start = np.vstack([np.zeros((1, self.num_groups), np.int64), cumulative[:-1]])
        within = position[kept] - start[batch, stream_groups]
        offset = rng.uniform(size=self.num_groups)[stream_groups]
        key = (within + offset) / counts[batch, stream_groups]
        order = stream[np.lexsort((key, batch))].reshape(nb, batch_size)
        return order[rng.permutation(nb)]
