"""Many hosts: each process reads a contiguous block of rows of every global batch.

Every process builds the same sampler (same seed), so all agree on the global batches without
talking to each other; process p of P takes rows [p * B / P, (p + 1) * B / P) of each batch, and
the processes' blocks in process order are the global batch (`bnjax.parallel.process_rows`,
what `bnjax.parallel.local_batch_to_global` assembles on a one-axis data-parallel mesh).
"""

from __future__ import annotations

import numpy as np

from bnjax.parallel import process_rows


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
    return order[:, process_rows(order.shape[1], process_index, process_count)]
