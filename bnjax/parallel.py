"""Data parallelism for training with batch norm: meshes, batch sharding, many hosts, step wrappers.

One per-device step `step(state, batch, axis_name) -> (state, metrics)` serves every mode:
it passes `axis_name` to `bnjax.batch_norm` (global statistics; None under jit, where the
reduction over the sharded batch is global anyway) and differentiates with
`data_parallel_value_and_grad`. Then

    mesh = data_mesh()                                   # every device, mesh axis "batch"
    run = jit_sharded_step(step, mesh)                   # or shard_map_step(step, mesh),
    state, metrics = run(state, batch)                   # or pmap_step(step)(state, batch)

Local (per-device) statistics: under jit, `ghost_batch_size` = the per-device batch; under
pmap/shard_map, no `axis_name` for batch norm and its state marked `per_device`.

Gradients differ between the modes: under pmap the gradient of a per-device loss is per device
and needs a `pmean`; under `jax.shard_map` the gradient with respect to a replicated
(invariant) parameter is already summed over devices by autodiff (the transpose of the
implicit `pvary`). `data_parallel_value_and_grad` casts the parameters to device-varying
first, so both give per-device gradients, then averages them once.

Meshes use `AxisType.Auto` (GSPMD propagation): under `jax.make_mesh`'s default Explicit axes,
plain model code such as `lax.conv_general_dilated` on a sharded batch asks for `out_sharding`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

StepFn = Callable[[Any, Any, Any], tuple[Any, Any]]


# --------------------------------------------------------------------------- meshes and data


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


# --------------------------------------------------------------------------- many hosts


def define_distributed_flags(flag_values=None) -> None:
    """Defines absl flags --coordinator_address, --num_processes, --process_id (unset: the
    environment) and --distributed_auto_detect (let JAX find what is unset: Cloud TPU pod
    slices, Slurm, Open MPI); pass their values to `initialize_distributed`.

    Example:
      >>> from absl import flags
      >>> flag_values = flags.FlagValues()
      >>> define_distributed_flags(flag_values)
      >>> _ = flag_values(["train.py", "--num_processes=4", "--process_id=1"])
      >>> flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
      (None, 4, 1)
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    for define, name, help_text in (
        (flags.DEFINE_string, "coordinator_address", "host:port of process 0 (many hosts)."),
        (flags.DEFINE_integer, "num_processes", "Number of processes (one per host)."),
        (flags.DEFINE_integer, "process_id", "This process's index, 0..num_processes-1."),
    ):
        define(name, None, help_text, flag_values=flag_values)
    flags.DEFINE_bool(
        "distributed_auto_detect",
        False,
        "Let JAX detect the coordinator, process count and index (Cloud TPU pod slices, Slurm, "
        "Open MPI) where --coordinator_address etc. are not given.",
        flag_values=flag_values,
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto_detect: bool = False,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime; call it first, before anything touches a device.

    Each argument left None is read from the environment: JAX_COORDINATOR_ADDRESS
    ("10.0.0.1:1234", process 0's host), JAX_NUM_PROCESSES, JAX_PROCESS_ID. Nothing to set
    (or one process) is a no-op, so one script serves one host and many. `auto_detect=True`
    lets JAX find missing values itself (Cloud TPU pods, Slurm, Open MPI).

    Args:
      cpu_collectives: cross-process collectives on CPU ("gloo"); ignored by GPU/TPU.

    Returns:
      True when this is now a multi-process run (jax.process_count() > 1 after it).

    Example:
      >>> initialize_distributed()                 # nothing set: one process, a no-op
      False
    """
    if jax.distributed.is_initialized():
        return True
    given = {
        "coordinator_address": coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _int_setting(num_processes, "num_processes", "JAX_NUM_PROCESSES"),
        "process_id": _int_setting(process_id, "process_id", "JAX_PROCESS_ID"),
    }
    if given["num_processes"] == 1 or (not auto_detect and all(v is None for v in given.values())):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing and not auto_detect:
        raise ValueError(
            f"Many-host set-up needs {', '.join(missing)} too (arguments, flags or "
            f"JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or auto_detect=True."
        )
    if cpu_collectives and "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        **given, local_device_ids=local_device_ids, initialization_timeout=initialization_timeout
    )
    return jax.process_count() > 1


def _int_setting(value, name: str, variable: str) -> int | None:
    text = os.environ.get(variable, "") if value is None else value
    try:
        return None if text == "" else int(text)
    except ValueError:
        raise ValueError(f"`{name}` (or ${variable}) must be an int, got {text!r}.") from None


# --------------------------------------------------------------------------- gradients


def _varying_axes(leaf) -> frozenset:
    aval = jax.typeof(leaf)
    mat = getattr(aval, "mat", None)  # jax >= 0.9; older versions call it `vma`
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _to_varying(tree, axis_name):
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    cast = getattr(lax, "pcast", None)

    def vary(leaf):
        missing = tuple(a for a in axes if a not in _varying_axes(leaf))
        if not missing:
            return leaf
        return cast(leaf, missing, to="varying") if cast else lax.pvary(leaf, missing)

    return jax.tree.map(vary, tree)


def data_parallel_value_and_grad(fun: Callable, axis_name, *, has_aux: bool = False, reduce="mean"):
    """`jax.value_and_grad(fun)` for a per-device loss, combined over the devices of `axis_name`.

    With `reduce="mean"` (each device's loss is a mean over the same number of examples) the
    value and gradient are those of the mean over devices, i.e. of the global batch's mean
    loss; with `reduce="sum"` (losses already divided by the global count, e.g. masked
    batches) they are summed. Both come out identical on every device, under pmap and
    shard_map alike; `axis_name=None` (one device, jit) is plain `jax.value_and_grad`. `aux`
    is returned as computed on each device. Differentiates with respect to the first argument.

    Example:
      >>> mesh = data_mesh()
      >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
      >>> grad_fn = data_parallel_value_and_grad(loss, "batch")
      >>> x = jnp.arange(2.0 * mesh.size)                          # 2 values per device
      >>> run = jax.shard_map(lambda x: grad_fn(jnp.array(2.0), x), mesh=mesh,
      ...                     in_specs=P("batch"), out_specs=P())
      >>> per_device, whole = run(x), jax.value_and_grad(loss)(jnp.array(2.0), x)
      >>> [bool(jnp.allclose(a, b)) for a, b in zip(per_device, whole)]   # value, gradient
      [True, True]
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f'`reduce` must be "mean" or "sum", got {reduce!r}.')
    value_and_grad = jax.value_and_grad(fun, has_aux=has_aux)
    if axis_name is None:
        return value_and_grad
    combine = lax.pmean if reduce == "mean" else lax.psum

    def wrapped(params, *args, **kwargs):
        out, grads = value_and_grad(_to_varying(params, axis_name), *args, **kwargs)
        value, aux = out if has_aux else (out, None)
        value, grads = combine((value, grads), axis_name)
        return ((value, aux) if has_aux else value), grads

    return wrapped


# --------------------------------------------------------------------------- step wrappers


def _layout(per_device, state) -> tuple[Any, tuple[bool, ...]]:
    """(treedef of `state`, one per-device flag per leaf) from a bool or a prefix tree of bools:
    a hashable key, so each wrapped step is built and compiled once per state layout."""
    flags = jax.tree.map(
        lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), per_device, state
    )
    return jax.tree.structure(state), tuple(jax.tree.leaves(flags))


def _place(state, flags, mesh: Mesh, spec: P):
    """Puts the state where the compiled step leaves it, so that the first call and the later
    ones run the same compiled program (one process; with many, `replicate` it first)."""
    if jax.process_count() > 1:
        return state
    leaves, treedef = jax.tree.flatten(state)
    shardings = [NamedSharding(mesh, spec if flag else P()) for flag in flags]
    return jax.tree.unflatten(treedef, jax.device_put(leaves, shardings))


def _place_batch(batch, mesh: Mesh):
    """A host batch is split over the devices here (one process); a placed one passes as is."""
    if jax.process_count() > 1:
        return batch
    return shard_batch(batch, mesh)


def pmap_step(
    step_fn: StepFn,
    *,
    axis_name: str = "batch",
    per_device=False,
    donate_state: bool = False,
) -> Callable:
    """Runs `step_fn(state, batch, axis_name)` under `jax.pmap` over this process's devices
    (pmap is in maintenance mode; prefer `shard_map_step` or `jit_sharded_step` in new code).

    The returned `run(state, batch) -> (state, metrics)` takes the process-local batch,
    (n, ...) with n divisible by `jax.local_device_count()`, and the state as one value (not
    stacked per device) except for the leaves marked `per_device` (a bool or a prefix tree of
    `state`), which carry a leading device axis in and out (local-mode batch-norm state, from
    `stack_copies`). The step must return the rest and the metrics identical on all devices.
    pmap cannot prove that (shard_map can), so the first call for each state layout checks
    it: it returns every device's copy and raises a ValueError naming the leaves that differ
    (e.g. a batch norm without `axis_name`, or gradients not averaged); later calls return
    the first device's copy without that cost.

    Example:
      >>> def step(bn_state, x, axis_name):                        # per device
      ...     _, bn_state = bnjax.batch_norm(x, bn_state, training=True, axis_name=axis_name)
      ...     return bn_state, {}
      >>> x = jax.random.normal(jax.random.key(0), (8 * jax.local_device_count(), 2))
      >>> state, _ = pmap_step(step)(bnjax.batch_norm_state(2), x)
      >>> _, whole = bnjax.batch_norm(x, bnjax.batch_norm_state(2), training=True)
      >>> bool(jnp.allclose(state.var, whole.var))                  # synced: the whole batch's
      True
    """

    @functools.cache
    def build(treedef, flags, checked: bool):
        # checked: replicated outputs come back per device (out axis 0) to be compared.
        axes = tuple(0 if flag else None for flag in flags)
        out_axes = tuple(0 if flag or checked else None for flag in flags)

        def flat_step(leaves, batch):  # flat leaves: pmap's multi-host path hashes its axes
            new_state, metrics = step_fn(jax.tree.unflatten(treedef, leaves), batch, axis_name)
            new_leaves, new_treedef = jax.tree.flatten(new_state)
            if new_treedef != treedef:
                raise ValueError(f"`step_fn` changed the state's structure to {new_treedef}.")
            return tuple(new_leaves), metrics

        return jax.pmap(
            flat_step,
            axis_name=axis_name,
            in_axes=(axes, 0),
            out_axes=(out_axes, 0 if checked else None),
            donate_argnums=(0,) if donate_state else (),
        )

    checked_layouts = set()

    def run(state, batch):
        count = jax.local_device_count()
        _check_leading(batch, count, "batch", "local devices (pmap)")
        split = jax.tree.map(lambda a: a.reshape((count, -1, *a.shape[1:])), batch)
        treedef, flags = _layout(per_device, state)
        mesh = Mesh(np.array(jax.local_devices()), (axis_name,))
        leaves = jax.tree.leaves(_place(state, flags, mesh, P(axis_name)))
        if (treedef, flags) in checked_layouts:
            new_leaves, metrics = build(treedef, flags, False)(tuple(leaves), split)
            return jax.tree.unflatten(treedef, new_leaves), metrics
        new_leaves, metrics = build(treedef, flags, True)(tuple(leaves), split)
        new_state = _first_copies(jax.tree.unflatten(treedef, new_leaves), flags, "state")
        metrics = _first_copies(metrics, None, "metrics")
        checked_layouts.add((treedef, flags))
        return new_state, metrics

    return run


def _first_copies(tree, flags: tuple[bool, ...] | None, what: str):
    """`tree` with device 0's copy of each replicated leaf (leaves flagged True are per-device
    and pass as they are; flags None: all replicated); a ValueError naming the leaves whose
    copies differ across devices."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flags = (False,) * len(with_paths) if flags is None else flags
    out, differ = [], []
    for (path, leaf), flag in zip(with_paths, flags, strict=True):
        if flag:
            out.append(leaf)
            continue
        host = np.asarray(leaf)
        first = np.broadcast_to(host[:1], host.shape)
        if not np.array_equal(host, first, equal_nan=np.issubdtype(host.dtype, np.inexact)):
            differ.append(jax.tree_util.keystr(path) or "<root>")
        out.append(leaf[0])
    if differ:
        raise ValueError(
            f"pmap_step: the step returned {what} that differ across devices at {differ}; "
            "under pmap each device's values must be synchronised: pass `axis_name` to batch "
            "norm and average gradients (data_parallel_value_and_grad), or mark per-device "
            "state with `per_device=`."
        )
    return jax.tree.unflatten(treedef, out)


def shard_map_step(
    step_fn: StepFn,
    mesh: Mesh,
    *,
    per_device=False,
    donate_state: bool = False,
) -> Callable:
    """Runs `step_fn(state, batch, axis_name)` under `jit(jax.shard_map)` over all of `mesh`'s
    axes (`axis_name` is their name, or the tuple of names for a 2-D mesh).

    `run(state, batch) -> (state, metrics)`: `batch` is global (N, ...), split over the
    devices along axis 0: a host array (split on the way in), or already placed by
    `shard_batch` / `local_batch_to_global` (which many processes need);
    state and metrics are replicated (`out_specs=P()`, checked: a value that still differs
    between devices is an error), except `per_device` leaves (as in `pmap_step`), whose
    leading axis has one entry per device of the mesh.

    Example:
      >>> def step(bn_state, x, axis_name):                        # per device
      ...     _, bn_state = bnjax.batch_norm(x, bn_state, training=True, axis_name=axis_name)
      ...     return bn_state, {}
      >>> x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 2))
      >>> state, _ = shard_map_step(step, data_mesh())(bnjax.batch_norm_state(2), x)
      >>> _, whole = bnjax.batch_norm(x, bnjax.batch_norm_state(2), training=True)
      >>> bool(jnp.allclose(state.var, whole.var))                  # synced: the whole batch's
      True
    """
    axes = mesh_axes(mesh)
    batch_spec = P(axes)

    @functools.cache
    def build(treedef, flags):
        flags = jax.tree.unflatten(treedef, flags)

        def body(state, batch):
            state = jax.tree.map(lambda flag, a: a[0] if flag else a, flags, state)
            new_state, metrics = step_fn(state, batch, axes)
            new_state = jax.tree.map(lambda flag, a: a[None] if flag else a, flags, new_state)
            return new_state, metrics

        specs = jax.tree.map(lambda flag: batch_spec if flag else P(), flags)
        mapped = jax.shard_map(
            body, mesh=mesh, in_specs=(specs, batch_spec), out_specs=(specs, P())
        )
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
        return jax.jit(
            mapped,
            in_shardings=(shardings, NamedSharding(mesh, batch_spec)),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=(0,) if donate_state else (),
        )

    def run(state, batch):
        treedef, flags = _layout(per_device, state)
        state = _place(state, flags, mesh, batch_spec)
        try:
            return build(treedef, flags)(state, _place_batch(batch, mesh))
        except ValueError as error:
            if "check_vma" not in str(error):
                raise
            # JAX suggests check_vma=False, which would hide the bug: say what to fix instead.
            raise ValueError(_not_replicated_message(str(error), axes)) from None

    return run


def _not_replicated_message(jax_message: str, axis_name) -> str:
    """shard_map_step's error for outputs that vary over devices, naming the leaves."""
    roots = {"0": "state", "1": "metrics"}
    leaves = [
        roots[root] + path
        for root, path in re.findall(r"out_specs\[([01])\](\S*) is P\(", jax_message)
    ]
    return (
        f"shard_map_step: the step returned {', '.join(leaves) or 'state or metrics'} that "
        f"differ between devices, but state and metrics come back as one replicated copy. "
        f"Batch-norm statistics and the gradient mean need the step to use the `axis_name` it "
        f"is given ({axis_name!r}): pass it to batch norm (`bnjax.batch_norm(..., "
        f"axis_name=axis_name)`, `BatchNorm(axis_name=axis_name)`) and average gradients and "
        f"metrics over it (`data_parallel_value_and_grad(loss, axis_name)` or "
        f"`lax.pmean(grads, axis_name)`); mark per-device state (local statistics) with "
        f"`per_device=`. Do not turn off check_vma: the devices' copies would silently differ."
    )


def jit_sharded_step(step_fn: StepFn, mesh: Mesh, *, donate_state: bool = False) -> Callable:
    """Runs `step_fn(state, batch, None)` under `jax.jit` on the global batch, sharded over all
    of `mesh`'s axes (GSPMD): reductions over the batch, batch-norm statistics and the mean
    loss included, are global by construction; the state stays replicated.

    `run(state, batch) -> (state, metrics)` with a global (N, ...) batch, as `shard_map_step`.

    Example:
      >>> def step(bn_state, x, axis_name):                        # axis_name is None here
      ...     _, bn_state = bnjax.batch_norm(x, bn_state, training=True, axis_name=axis_name)
      ...     return bn_state, {}
      >>> x = jax.random.normal(jax.random.key(0), (8 * jax.device_count(), 2))
      >>> state, _ = jit_sharded_step(step, data_mesh())(bnjax.batch_norm_state(2), x)
      >>> _, whole = bnjax.batch_norm(x, bnjax.batch_norm_state(2), training=True)
      >>> bool(jnp.allclose(state.var, whole.var))                  # global by construction
      True
    """
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        lambda state, batch: step_fn(state, batch, None),
        in_shardings=(replicated, _batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate_state else (),
    )

    def run(state, batch):
        state = _place(state, [False] * len(jax.tree.leaves(state)), mesh, P())
        return jitted(state, _place_batch(batch, mesh))

    return run
