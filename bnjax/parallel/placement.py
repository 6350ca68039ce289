"""Where values live: batches split over a mesh's devices, replicated state, values back on
the host, and which rows of every batch each process reads.

A global batch (N, ...) on a mesh of D devices is split along axis 0 over all of the mesh's
axes: device i holds rows [i*N/D, (i+1)*N/D). With many processes, each one holds (and its
loader reads) only the rows of its own devices, `local_rows`; `local_batch_to_global`
assembles the global array from them without any process holding the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax.parallel.meshes import mesh_axes


def _check_leading(tree, divisor: int, argument: str, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if not shape or shape[0] % divisor:
            raise ValueError(
                f"`{argument}{jax.tree_util.keystr(path)}` has shape {shape}: its leading (batch) "
                f"axis must divide evenly over {divisor} {what}; drop or pad (and mask) the "
                f"remainder."
            )


def shard_batch(batch, mesh: Mesh):
    """Splits a global batch (a pytree of (N, ...) arrays, the same on every process) over
    all of `mesh`'s axes along axis 0: device i holds rows [i*N/D, (i+1)*N/D).

    Example:
      >>> from bnjax.parallel import data_mesh
      >>> mesh = data_mesh()
      >>> batch = shard_batch({"x": jnp.zeros((4 * mesh.size, 3))}, mesh)
      >>> batch["x"].addressable_shards[0].data.shape               # each device: 4 rows
      (4, 3)
    """
    _check_leading(batch, mesh.size, "batch", f"devices of the mesh {dict(mesh.shape)}")
    return _put(batch, _batch_sharding(mesh))


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 split over all of `mesh`'s axes: the layout of every data-parallel batch here."""
    return NamedSharding(mesh, P(mesh_axes(mesh)))


def _put(tree, sharding: NamedSharding):
    """device_put, also across processes (each one then sends only its own devices' parts)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of every global batch that process `process_index` of `process_count` reads: a
    contiguous block, so that the processes' blocks in process order are the global batch (the
    layout `local_rows` finds on a one-axis data-parallel mesh, and the one the data pipelines
    of `bnjax.data` read without a mesh).

    Example:
      >>> [process_rows(8, process_index, 2) for process_index in range(2)]
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


def local_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under `shard_batch`'s
    layout on `mesh`: what this host's data loader must read for `local_batch_to_global`
    (`process_rows` of this process on the usual mesh, where each process's devices follow
    each other).

    Example:
      >>> from bnjax.parallel import data_mesh
      >>> mesh = data_mesh()
      >>> local_rows(mesh, 8 * mesh.size) == slice(0, 8 * mesh.size)   # one process: all
      True
    """
    indices = _batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted(index[0].start or 0 for index in indices.values())
    size = global_batch_size // mesh.size
    if starts != list(range(starts[0], starts[0] + size * len(starts), size)):
        raise ValueError(f"This process's devices are not contiguous in the mesh: {starts}.")
    return slice(starts[0], starts[0] + size * len(starts))


def local_batch_to_global(local_batch, mesh: Mesh):
    """A global batch from each process's own rows (see `local_rows`), without any process
    holding the whole batch. Pytree of (n, ...) -> (n * process_count, ...), sharded.

    Example:
      >>> from bnjax.parallel import data_mesh
      >>> mesh = data_mesh()
      >>> rows = local_rows(mesh, 2 * mesh.size)                  # this process's rows
      >>> local = {"x": np.arange(2.0 * mesh.size)[rows]}          # what its loader read
      >>> glob = local_batch_to_global(local, mesh)
      >>> glob["x"].shape == (2 * mesh.size,), len(glob["x"].addressable_shards) == mesh.size
      (True, True)
    """
    sharding = _batch_sharding(mesh)
    local_devices = len(mesh.local_devices)
    _check_leading(local_batch, local_devices, "local_batch", "local devices of this process")
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
        local_batch,
    )


def replicate(tree, mesh: Mesh):
    """Places a pytree (parameters, optimizer and batch-norm state) on every device of `mesh`.

    Example:
      >>> from bnjax.parallel import data_mesh
      >>> params = replicate({"w": jnp.ones(3)}, data_mesh())
      >>> params["w"].sharding.is_fully_replicated
      True
    """
    return _put(tree, NamedSharding(mesh, P()))


def stack_copies(tree, num_copies: int):
    """One copy per device along a new leading axis: the initial value of `per_device` state.

    Example:
      >>> state = stack_copies(bnjax.batch_norm_state(3), 4)
      >>> state.mean.shape, state.count.shape
      ((4, 3), (4,))
    """
    return jax.tree.map(lambda leaf: jnp.stack([jnp.asarray(leaf)] * num_copies), tree)


def to_host(tree):
    """NumPy values of a pytree of (possibly multi-host) arrays, on every process.

    Example:
      >>> to_host({"loss": jnp.array(0.5)})
      {'loss': array(0.5, dtype=float32)}
    """

    def fetch(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(leaf)
        if leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)
