"""Normalization with batch statistics, with a hand-written VJP that keeps only the input.

Forward, per statistics group (a channel of a ghost batch, synced over devices if asked):

    mu, var = moments of the valid x (biased variance), inv = 1 / sqrt(var + eps)
    x_hat = (x - mu) * inv
    y = scale * x_hat + bias

Backward. Let m_j be 1 for values that entered the statistics and 0 for masked ones, n the
(global) number of valid values, and g_mu, g_var the cotangents of the returned statistics.
Every output depends on mu and var, masked outputs included, so the sums run over all values:

    A = sum_i scale * inv * dy_i - g_mu
    B = sum_i scale * inv * dy_i * x_hat_i - 2 * g_var * sqrt(var + eps)
    dx_j = scale * inv * dy_j - m_j * (A + x_hat_j * B) / n
    dscale = sum_j dy_j * x_hat_j,   dbias = sum_j dy_j          (local sums, as autodiff gives)

With `axis_name`, A and B are `psum`ed (one collective of 2 x channels), because each device's
values moved the global statistics. Residuals are the input itself plus per-channel vectors:
autodiff of the plain formula also keeps `x - mu` (a second full-size float32 array).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import stats

Array = jax.Array


class KernelConfig(NamedTuple):
    """Static options of the kernel (hashable, so they can be a nondiff argument)."""

    reduction_axes: tuple[int, ...]
    epsilon: float
    axis_name: object = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


def batch_moments(x: Array, mask: Array | None, config: KernelConfig) -> stats.Moments:
    """Moments over the reduction axes, merged across devices when `config.axis_name` is set."""
    local = stats.moments(x, config.reduction_axes, mask)
    if config.axis_name is None:
        return local
    return stats.merge_across_devices(local, config.axis_name, config.axis_index_groups)


def _sum_to_shape(value: Array, shape: tuple[int, ...]) -> Array:
    """Sums `value` over the axes where `shape` has size 1 (undoes broadcasting)."""
    pairs = enumerate(zip(value.shape, shape, strict=True))
    axes = tuple(i for i, (have, want) in pairs if want == 1 != have)
    return jnp.sum(value, axis=axes, keepdims=True) if axes else value


def _forward(x, scale, bias, mask, config):
    batch = batch_moments(x, mask, config)
    var = batch.m2 / jnp.maximum(batch.count, 1)
    inv = lax.rsqrt(var + config.epsilon)
    # (x - mu) first: x and mu are close when |mu| >> std, so the difference is exact in float32,
    # whereas folding mu into the bias would round it at the scale of |mu|.
    y = (x.astype(inv.dtype) - batch.mean) * (scale * inv) + bias
    return y.astype(x.dtype), batch.mean, var, batch.count, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def normalize_with_batch_stats(x, scale, bias, mask, config: KernelConfig):
    """Normalizes `x` with its own (masked, possibly cross-device) statistics.

    Args:
      x: input of any floating dtype.
      scale, bias: float arrays broadcastable to `x` with size 1 on the reduction axes.
      mask: None, or a boolean array broadcastable to `x` (False = not in the statistics).
      config: the static KernelConfig.

    Returns:
      (y, mean, var, count): y has x's dtype; mean, biased var and count have x's shape with
      size 1 on the reduction axes, in float32 (float64 for float64 x).
    """
    y, mean, var, count, _ = _forward(x, scale, bias, mask, config)
    return y, mean, var, count


def _fwd(x, scale, bias, mask, config):
    y, mean, var, count, inv = _forward(x, scale, bias, mask, config)
    return (y, mean, var, count), (x, scale, bias, mask, mean, inv, count)


def _bwd(config, residuals, cotangents):
    x, scale, bias, mask, mean, inv, count = residuals
    dy, g_mean, g_var, _ = cotangents
    dtype = inv.dtype
    dy = dy.astype(dtype)
    x_hat = (x.astype(dtype) - mean) * inv
    axes = config.reduction_axes
    sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
    sum_dy_xhat = jnp.sum(dy * x_hat, axis=axes, keepdims=True)
    gain = scale * inv
    a_term = gain * sum_dy - g_mean
    b_term = gain * sum_dy_xhat - 2 * g_var / inv
    if config.axis_name is not None:
        a_term, b_term = lax.psum(
            (a_term, b_term), config.axis_name, axis_index_groups=config.axis_index_groups
        )
    correction = (a_term + x_hat * b_term) / jnp.maximum(count, 1)
    if mask is not None:
        correction = jnp.where(mask, correction, 0)
    dx = gain * dy - correction
    d_scale = _sum_to_shape(sum_dy_xhat, scale.shape).astype(scale.dtype)
    d_bias = _sum_to_shape(sum_dy, bias.shape).astype(bias.dtype)
    return dx.astype(x.dtype), d_scale, d_bias, None


normalize_with_batch_stats.defvjp(_fwd, _bwd)


def _varying_axes(value: Array) -> frozenset:
    """Mesh axes `value` varies over inside `shard_map` (empty outside it)."""
    aval = jax.typeof(value)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # older jax


def _vary_like(value: Array, like: Array) -> Array:
    """Marks `value` as varying over the mesh axes `like` varies over (shard_map typing).

    Inside `shard_map`, a replicated scale is "invariant" while the input shard is "varying";
    the custom VJP must return a cotangent of its primal's type, but the local dscale varies.
    Casting first gives the kernel varying parameters, and the transpose of the cast sums
    dscale over devices, exactly what autodiff of the plain formula gives.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(value), key=str))
    if not missing:
        return value
    if hasattr(lax, "pcast"):
        return lax.pcast(value, missing, to="varying")
    return lax.pvary(value, missing)


def normalize(x, scale, bias, mask, config: KernelConfig):
    """`normalize_with_batch_stats`, with parameters typed like `x` for `shard_map`."""
    return normalize_with_batch_stats(x, _vary_like(scale, x), _vary_like(bias, x), mask, config)
