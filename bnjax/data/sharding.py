"""Many hosts: each process reads a contiguous block of rows of every global batch.

Every process builds the same sampler (same seed), so all agree on the global batches without
talking to each other; process p of P takes rows [p * B / P, (p + 1) * B / P) of each batch, and
the processes' blocks in process order are the global batch (what
`bnjax.parallel.local_batch_to_global` assembles on a one-axis data-parallel mesh).
"""

from __future__ import annotations

import numpy as np


def local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of every global batch that process `process_index` of `process_count` reads: a
    contiguous block, so that concatenating the processes' blocks in process order gives the
    global batch (the layout of `bnjax.parallel.local_rows` with one data-parallel mesh axis).

    Example:
      >>> [local_rows(8, process_index, 2) for process_index in range(2)]
      [slice(0, 4, None), slice(4, 8, None)]
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got {process_index}, {process_count}."
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}."
        )
    size = batch_size // process_count
    return slice(process_index * size, (process_index + 1) * size)


def shard(order: np.ndarray, process_index: int | None = None, process_count: int | None = None):
    """This process's part of an epoch: (num_batches, batch_size) -> (num_batches,
    batch_size // process_count). Defaults: `jax.process_index()` and `jax.process_count()`.

    Example:
      >>> order = np.arange(12).reshape(3, 4)
      >>> shard(order, 1, 2).tolist()
      [[2, 3], [6, 7], [10, 11]]
    """
    if process_index is None or process_count is None:
        import jax  # only for the defaults: the samplers are plain NumPy

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return order[:, local_rows(order.shape[1], process_index, process_count)]
