"""Data-parallel meshes: the devices in one axis (or groups of them), and their axis names.

A batch of N rows is split over all of a mesh's D devices along axis 0 (`shard_batch`), so
each device's batch norm sees N / D rows; `axis_name` syncs its statistics over the named
axis. A 2-D mesh (replica, batch) from `sync_group_size` keeps the statistics within groups of
devices while gradients are still averaged over every device.

Meshes use `AxisType.Auto` (GSPMD propagation): under `jax.make_mesh`'s default Explicit axes,
plain model code such as `lax.conv_general_dilated` on a sharded batch asks for `out_sharding`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh


def data_mesh(
    num_devices: int | None = None,
    *,
    axis_name: str = "batch",
    sync_group_size: int | None = None,
    replica_axis_name: str = "replica",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A data-parallel mesh: 1-D `(axis_name,)`, or 2-D `(replica_axis_name, axis_name)`.

    Args:
      num_devices: how many of `devices` (default all of them, every process's) to use.
      axis_name: the mesh axis the batch is split over and batch norm syncs over.
      sync_group_size: for large pods, devices per statistics group: the mesh becomes
        (num_devices // sync_group_size, sync_group_size) with axes (replica, batch). Batch
        norm with `axis_name=axis_name` then syncs within each group; gradients are averaged
        over both axes (the step wrappers pass both names).
      devices: default `jax.devices()`.

    Example:
      >>> dict(data_mesh(1).shape), dict(data_mesh(1, sync_group_size=1).shape)
      ({'batch': 1}, {'replica': 1, 'batch': 1})
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"`num_devices`={num_devices} must be in 1..{len(devices)} (devices).")
    if sync_group_size is None:
        shape, names = (count,), (axis_name,)
    else:
        if sync_group_size < 1 or count % sync_group_size:
            raise ValueError(
                f"`sync_group_size`={sync_group_size} must divide `num_devices`={count}."
            )
        shape, names = (count // sync_group_size, sync_group_size), (replica_axis_name, axis_name)
    return jax.make_mesh(shape, names, (AxisType.Auto,) * len(shape), devices=devices[:count])


def mesh_axes(mesh: Mesh):
    """All of `mesh`'s axis names as one collective axis: a name, or a tuple of names.

    Example:
      >>> mesh_axes(data_mesh(1)), mesh_axes(data_mesh(1, sync_group_size=1))
      ('batch', ('replica', 'batch'))
    """
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def sync_groups(num_devices: int, group_size: int) -> list[list[int]]:
    """`axis_index_groups` for pmap: consecutive devices in groups of `group_size`.

    Example:
      >>> sync_groups(4, 2)
      [[0, 1], [2, 3]]
    """
    if group_size < 1 or num_devices % group_size:
        raise ValueError(f"`group_size`={group_size} must divide `num_devices`={num_devices}.")
    return [list(range(g, g + group_size)) for g in range(0, num_devices, group_size)]
