"""Step wrappers: one per-device training step run under pmap, jit(shard_map) or jit.

One per-device step `step(state, batch, axis_name) -> (state, metrics)` serves every mode: it
passes `axis_name` to `bnjax.batch_norm` (global statistics; None under jit, where the
reduction over the sharded batch is global anyway) and differentiates with
`data_parallel_value_and_grad`. The wrappers place the state and the batch, compile once per
state layout, and refuse a step whose replicated outputs differ between devices, naming them.

Local (per-device) statistics: under jit, `ghost_batch_size` = the per-device batch; under
pmap/shard_map, no `axis_name` for batch norm and its state marked `per_device`: a leaf with a
leading axis of one entry per device, in and out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax.parallel.gradients import _varying_axes
from bnjax.parallel.meshes import mesh_axes
from bnjax.parallel.placement import _batch_sharding, _check_leading, shard_batch

StepFn = Callable[[Any, Any, Any], tuple[Any, Any]]


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
      >>> from bnjax.parallel import data_mesh
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
            _refuse_varying_outputs(new_state, flags, metrics, mesh)
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
        return build(treedef, flags)(state, _place_batch(batch, mesh))

    return run


def _refuse_varying_outputs(new_state, flags, metrics, mesh: Mesh) -> None:
    """Raises shard_map_step's error if a replicated output (a state leaf not marked
    per-device, or a metric) may still differ between devices, naming each such leaf and the
    mesh axes it varies over.

    shard_map's check_vma would refuse these outputs too (out_specs P()), but its message
    suggests turning check_vma off, which would hide the bug; the type JAX gives each traced
    value already records the axes it varies over, so the leaves are found here, before
    shard_map checks, without reading another library's message. Anything else JAX raises
    comes through as it is.
    """
    varying = []

    def note(root: str, path, leaf) -> None:
        axes = _varying_axes(leaf)
        if axes:
            over = ", ".join(repr(name) for name in mesh.axis_names if name in axes)
            varying.append(f"{root}{jax.tree_util.keystr(path)} (over {over})")

    jax.tree_util.tree_map_with_path(
        lambda path, flag, leaf: None if flag else note("state", path, leaf), flags, new_state
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(metrics):
        note("metrics", path, leaf)
    if not varying:
        return
    axis_name = mesh_axes(mesh)
    raise ValueError(
        f"shard_map_step: the step returned {', '.join(varying)} that differ between "
        f"devices, but state and metrics come back as one replicated copy. Batch-norm "
        f"statistics and the gradient mean need the step to use the `axis_name` it is given "
        f"({axis_name!r}): pass it to batch norm (`bnjax.batch_norm(..., axis_name=axis_name)`, "
        f"`BatchNorm(axis_name=axis_name)`) and average gradients and metrics over it "
        f"(`data_parallel_value_and_grad(loss, axis_name)` or `lax.pmean(grads, axis_name)`); "
        f"mark per-device state (local statistics) with `per_device=`. Do not turn off "
        f"check_vma: the devices' copies would silently differ."
    )


def jit_sharded_step(step_fn: StepFn, mesh: Mesh, *, donate_state: bool = False) -> Callable:
    """Runs `step_fn(state, batch, None)` under `jax.jit` on the global batch, sharded over all
    of `mesh`'s axes (GSPMD): reductions over the batch, batch-norm statistics and the mean
    loss included, are global by construction; the state stays replicated.

    `run(state, batch) -> (state, metrics)` with a global (N, ...) batch, as `shard_map_step`.

    Example:
      >>> from bnjax.parallel import data_mesh
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
