"""From a dataset and a batch order to the batches a training loop consumes, on each process.

Two paths, the same batches (tested):

- in memory (the default; all of bnjax's datasets fit): `batches(dataset, sampler, ...)`
  gathers each of this process's rows from the `Dataset`'s arrays;
- grain (for TFDS sources read lazily): `bnjax.data.grain_pipeline.grain_loader(source,
  sampler, ...)` is a `grain.python.DataLoader` that replays the same epoch orders, with
  worker processes, prefetching and a checkpointable iterator state if you want them.

Multi-host: every process builds the same sampler (same seed), and takes its contiguous block
of rows of each global batch (`bnjax.data.sharding.shard`); `process_index=None` means
`jax.process_index()`. The global batch is the processes' blocks in process order, which is
what `bnjax.parallel.local_batch_to_global` assembles.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

from bnjax.data.dataset import Dataset
from bnjax.data.samplers import (
    BalancedSampler,
    BatchSampler,
    ClusteredSampler,
    SkewedSampler,
    UniformSampler,
)
from bnjax.data.sharding import shard


def _group_ids(kind: str, groups_or_size) -> np.ndarray:
    if np.ndim(groups_or_size) != 1:
        raise ValueError(f"Sampler {kind!r} needs the (N,) group ids, not a size.")
    return np.asarray(groups_or_size)


def _uniform(groups_or_size, batch_size, seed, **unused) -> BatchSampler:
    size = groups_or_size if np.ndim(groups_or_size) == 0 else len(groups_or_size)
    return UniformSampler(num_examples=int(size), batch_size=batch_size, seed=seed)


def _clustered(groups_or_size, batch_size, seed, shuffle_batches, **unused) -> BatchSampler:
    groups = _group_ids("clustered", groups_or_size)
    return ClusteredSampler(
        groups=groups, batch_size=batch_size, seed=seed, shuffle_batches=shuffle_batches
    )


def _skewed(groups_or_size, batch_size, seed, skew, num_dominant, **unused) -> BatchSampler:
    groups = _group_ids("skewed", groups_or_size)
    return SkewedSampler(
        groups=groups, batch_size=batch_size, seed=seed, skew=skew, num_dominant=num_dominant
    )


def _balanced(groups_or_size, batch_size, seed, **unused) -> BatchSampler:
    groups = _group_ids("balanced", groups_or_size)
    return BalancedSampler(groups=groups, batch_size=batch_size, seed=seed)


# The registry: name -> build(groups_or_size, batch_size, seed, skew, num_dominant,
# shuffle_batches). Its keys are the valid sampler names (configs' `sampler`, study conditions).
SAMPLERS: dict[str, Callable[..., BatchSampler]] = {
    "uniform": _uniform,
    "clustered": _clustered,
    "skewed": _skewed,
    "balanced": _balanced,
}


def make_sampler(
    kind: str,
    groups_or_size,
    batch_size: int,
    *,
    seed: int = 0,
    skew: float = 0.5,
    num_dominant: int = 1,
    shuffle_batches: bool = False,
) -> BatchSampler:
    """A sampler by name, for configs and flags.

    Args:
      kind: a key of `SAMPLERS`: 'uniform', 'clustered', 'skewed' or 'balanced' (see
        `bnjax.data.samplers`).
      groups_or_size: (N,) group ids (e.g. `dataset.groups('class')` or
        `dataset.groups('subcluster')`), or the number of examples N for 'uniform'.
      batch_size: the global batch size.
      seed, skew, num_dominant, shuffle_batches: passed to the sampler that takes them.

    Example:
      >>> from bnjax.data import ClusterConfig, load
      >>> data = load("clusters", "test", config=ClusterConfig(num_classes=4, test_per_class=8))
      >>> make_sampler("skewed", data.groups("class"), 8, skew=0.75).epoch(0).shape
      (4, 8)
    """
    if kind not in SAMPLERS:
        raise ValueError(f"Unknown sampler {kind!r}; choose one of {tuple(SAMPLERS)}.")
    return SAMPLERS[kind](
        groups_or_size,
        batch_size,
        seed,
        skew=skew,
        num_dominant=num_dominant,
        shuffle_batches=shuffle_batches,
    )


def resolve_process(process_index, process_count) -> tuple[int, int]:
    """(process_index, process_count), with None meaning jax's value for this process."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def batches(
    dataset: Dataset,
    sampler: BatchSampler,
    *,
    start_epoch: int = 0,
    num_epochs: int | None = 1,
    process_index: int | None = 0,
    process_count: int | None = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches, epoch after epoch (forever if `num_epochs` is None).

    Yields `dataset.take(rows)` dicts: 'image' (b, H, W, C) float32, 'label' (b,) int32,
    'index' (b,) and 'subcluster' (b,) where available, with b = batch_size // process_count.
    To resume at step s, start at epoch s // sampler.num_batches and skip the remainder.

    Example:
      >>> from bnjax.data import ClusterConfig, load
      >>> data = load("clusters", "test", config=ClusterConfig(num_classes=4, test_per_class=8))
      >>> sampler = make_sampler("balanced", data.labels, batch_size=8)
      >>> [batch["label"].shape for batch in batches(data, sampler)][:2]
      [(8,), (8,)]
    """
    if len(dataset) != sampler.num_examples:
        raise ValueError(
            f"The sampler orders {sampler.num_examples} examples, the dataset has {len(dataset)}."
        )
    process_index, process_count = resolve_process(process_index, process_count)
    epochs = (
        itertools.count(start_epoch)
        if num_epochs is None
        else range(start_epoch, start_epoch + num_epochs)
    )
    for epoch in epochs:
        for rows in shard(sampler.epoch(epoch), process_index, process_count):
            yield dataset.take(rows)
