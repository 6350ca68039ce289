"""The gradient of the global batch's loss from per-device losses, the same under every mode.

The modes differentiate differently: under pmap the gradient of a per-device loss is per
device and needs a `pmean`; under `jax.shard_map` the gradient with respect to a replicated
(invariant) parameter is already summed over devices by autodiff (the transpose of the
implicit `pcast` to varying). `data_parallel_value_and_grad` casts the parameters to
device-varying first, so both give per-device gradients, then averages them once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax


def _varying_axes(leaf) -> frozenset[str]:
    """The mesh axes over which `leaf` may differ between devices, as JAX's type of it records
    them (inside `jax.shard_map` with check_vma; none elsewhere, under pmap and jit included)."""
    return frozenset(jax.typeof(leaf).mat.varying)


def _to_varying(tree, axis_name):
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

    def vary(leaf):
        missing = tuple(a for a in axes if a not in _varying_axes(leaf))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

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
      >>> from jax.sharding import PartitionSpec as P
      >>> from bnjax.parallel import data_mesh
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
