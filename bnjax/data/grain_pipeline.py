"""The grain path: a `grain.python.DataLoader` that replays bnjax's epoch orders.

Use it for sources read lazily (`bnjax.data.tfds_source.open_source`), where grain's worker
processes read and decode in parallel and its iterator state can be checkpointed. It yields
the same batches, in the same order, as the in-memory `bnjax.data.pipeline.batches` (tested,
with and without worker processes).

Design: the records grain sees are whole batches. `EpochBatchSource` is a random-access source
whose item k is this process's k-th batch (epoch k // num_batches), read from the underlying
source in our sampler's order; grain's plain `IndexSampler` walks it in order. Why not grain's
own shuffling and `Batch`: `IndexSampler(shuffle=True)` only shuffles uniformly and shards by
striding over records, and with worker processes grain hands each worker every W-th record
and batches within the worker, which would change a batch's composition, the very thing the
study controls. With one record per batch, workers take whole batches and grain's
round-robin over workers restores their order.
"""

from __future__ import annotations

import grain.python as grain
import numpy as np

from bnjax.data.pipeline import resolve_process
from bnjax.data.samplers import BatchSampler
from bnjax.parallel import process_rows


class EpochBatchSource:
    """Random access to one process's batches: item k is batch k % num_batches of epoch
    start_epoch + k // num_batches, a dict of stacked arrays (b, ...) with b =
    batch_size // process_count, plus 'index' (b,) (the records' positions in `source`).

    Picklable when `source` and `transform` are (grain's workers need that).

    Example:
      >>> from bnjax.data.samplers import UniformSampler
      >>> records = [{"x": np.float32(i)} for i in range(10)]
      >>> batches = EpochBatchSource(records, UniformSampler(num_examples=10, batch_size=4))
      >>> len(batches), batches[1]["x"].shape
      (2, (4,))
    """

    def __init__(
        self,
        source,
        sampler: BatchSampler,
        transform=None,
        *,
        num_epochs: int = 1,
        start_epoch: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(source) != sampler.num_examples:
            raise ValueError(
                f"The sampler orders {sampler.num_examples} examples, the source has {len(source)}."
            )
        self.source, self.sampler, self.transform = source, sampler, transform
        self.num_epochs, self.start_epoch = num_epochs, start_epoch
        self.rows = process_rows(sampler.batch_size, process_index, process_count)
        self._cached: tuple[int, np.ndarray] | None = None  # the last epoch's local order

    def __len__(self) -> int:
        return self.num_epochs * self.sampler.num_batches

    def __repr__(self) -> str:  # grain checks a restored state against repr(data_source)
        sampler = self.sampler
        return (
            f"EpochBatchSource(source={self.source!r}, sampler={type(sampler).__name__}("
            f"num_examples={sampler.num_examples}, batch_size={sampler.batch_size}, "
            f"seed={sampler.seed}), epochs={self.start_epoch}+{self.num_epochs}, "
            f"rows={self.rows.start}:{self.rows.stop})"
        )

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.sampler.epoch(epoch)[:, self.rows])
        return self._cached[1]

    def __getitem__(self, key: int) -> dict[str, np.ndarray]:
        if not 0 <= key < len(self):
            raise IndexError(f"Batch {key} is past the {self.num_epochs} epoch(s) requested.")
        epoch, batch = divmod(int(key), self.sampler.num_batches)
        indices = self._epoch_rows(self.start_epoch + epoch)[batch]
        records = [self.source[int(i)] for i in indices]
        if self.transform is not None:
            records = [self.transform(record) for record in records]
        stacked = {name: np.stack([r[name] for r in records]) for name in records[0]}
        return stacked | {"index": indices}


def grain_loader(
    source,
    sampler: BatchSampler,
    transform=None,
    *,
    num_epochs: int = 1,
    start_epoch: int = 0,
    process_index: int | None = 0,
    process_count: int | None = 1,
    worker_count: int = 0,
) -> grain.DataLoader:
    """A `grain.python.DataLoader` over a random-access `source` in `sampler`'s order.

    Args:
      source: anything with len() and [i] -> dict, e.g. `tfds_source.open_source(...)`.
      sampler: built on this source's examples (group ids from `tfds_source.read_labels`).
      transform: a function record -> record applied to each example (e.g.
        `functools.partial(tfds_source.preprocess, 'mnist')`); None keeps records as read.
      num_epochs, start_epoch: which epochs of the sampler to replay.
      process_index, process_count: this process's rows (None: jax's values).
      worker_count: grain worker processes (0 reads in this process). Workers need absl flags
        parsed (grain reads its flags there): run under `absl.app.run`, as the scripts do.

    Iterating yields this process's batches, dicts of (b, ...) arrays with 'index'.

    Example:
      >>> from bnjax.data.samplers import UniformSampler
      >>> records = [{"x": np.float32(i)} for i in range(10)]
      >>> loader = grain_loader(records, UniformSampler(num_examples=10, batch_size=4))
      >>> [batch["x"].shape for batch in loader]
      [(4,), (4,)]
    """
    process_index, process_count = resolve_process(process_index, process_count)
    batches = EpochBatchSource(
        source,
        sampler,
        transform,
        num_epochs=num_epochs,
        start_epoch=start_epoch,
        process_index=process_index,
        process_count=process_count,
    )
    return grain.DataLoader(
        data_source=batches,
        sampler=grain.IndexSampler(
            num_records=len(batches),
            shard_options=grain.NoSharding(),
            shuffle=False,
            num_epochs=1,
        ),
        worker_count=worker_count,
    )
