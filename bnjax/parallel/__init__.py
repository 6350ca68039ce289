"""Data parallelism for training with batch norm: meshes, batch sharding, many hosts, step wrappers.

One per-device step `step(state, batch, axis_name) -> (state, metrics)` serves every mode:
it passes `axis_name` to `bnjax.batch_norm` (global statistics; None under jit, where the
reduction over the sharded batch is global anyway) and differentiates with
`data_parallel_value_and_grad`. Then

    mesh = data_mesh()                                   # every device, mesh axis "batch"
    run = jit_sharded_step(step, mesh)                   # or shard_map_step(step, mesh),
    state, metrics = run(state, batch)                   # or pmap_step(step)(state, batch)

- `bnjax.parallel.meshes`: `data_mesh` (1-D, or 2-D for sync groups), `mesh_axes`,
  `sync_groups`.
- `bnjax.parallel.placement`: `shard_batch`, `replicate`, `stack_copies`, `to_host`, and the
  rows each process reads: `process_rows`, `local_rows`, `local_batch_to_global`.
- `bnjax.parallel.distributed`: `initialize_distributed` (many hosts), and
  `define_distributed_flags` for a command line (needs absl, imported only when called).
- `bnjax.parallel.gradients`: `data_parallel_value_and_grad`, the same per-device gradients
  under pmap and shard_map.
- `bnjax.parallel.steps`: `pmap_step`, `shard_map_step`, `jit_sharded_step`.

Every name is importable from `bnjax.parallel` itself.
"""

from bnjax.parallel.distributed import define_distributed_flags, initialize_distributed
from bnjax.parallel.gradients import data_parallel_value_and_grad
from bnjax.parallel.meshes import data_mesh, mesh_axes, sync_groups
from bnjax.parallel.placement import (
    local_batch_to_global,
    local_rows,
    process_rows,
    replicate,
    shard_batch,
    stack_copies,
    to_host,
)
from bnjax.parallel.steps import StepFn, jit_sharded_step, pmap_step, shard_map_step

__all__ = [
    "StepFn",
    "data_mesh",
    "data_parallel_value_and_grad",
    "define_distributed_flags",
    "initialize_distributed",
    "jit_sharded_step",
    "local_batch_to_global",
    "local_rows",
    "mesh_axes",
    "pmap_step",
    "process_rows",
    "replicate",
    "shard_batch",
    "shard_map_step",
    "stack_copies",
    "sync_groups",
    "to_host",
]
