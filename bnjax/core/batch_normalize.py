"""Normalization with batch statistics, with a hand-written derivative that keeps only the input.

Forward, per statistics group (a channel of a ghost batch, synced over devices if asked):

    mu, var = moments of the valid x (biased variance), inv = 1 / sqrt(var + eps)
    x_hat = (x - mu) * inv
    y = scale * x_hat + bias

Derivative. Let m_j be 1 for values that entered the statistics and 0 for masked ones, and n
the (global) number of valid values. The tangent map (JVP) is

    t_mu = sum_j m_j t_x_j / n,          u = sum_j m_j x_hat_j t_x_j / n
    t_var = 2 u / inv
    t_y = scale * inv * (t_x - t_mu - x_hat * u) + t_scale * x_hat + t_bias

and its transpose, which JAX derives for reverse mode, is the classic batch-norm backward

    dx_j = scale * inv * dy_j - m_j * (A + x_hat_j * B) / n
    A = sum_i scale * inv * dy_i,   B = sum_i scale * inv * dy_i * x_hat_i

(every output, masked ones included, depends on mu and var, so A and B sum over all values).
With `axis_name` the forward statistics are merged in one collective
(`stats.merge_across_devices`) and the backward's two sums are `psum`ed together: one
collective of 2 x channels.

epsilon is a static option when its value is known at trace time (the usual Python float), and
an operand when it is traced (e.g. a jit argument); its tangent then enters through
d inv / d epsilon = -inv^3 / 2, so t_y gains x_hat * scale * (-inv^2 / 2) * t_epsilon.

Why a custom JVP and not a custom VJP: the rule is linear in the tangents, so one rule serves
forward mode (jvp, jacfwd, Hessian-vector products, which a custom_vjp refuses) and reverse mode
(by transposition), at every order. `jax.checkpoint` with a names policy then keeps only the
input and the per-channel statistics for the backward pass; x_hat is recomputed inside the
backward's fused loops instead of being stored as a second full-size float32 array, which is
what autodiff of the plain formula keeps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from bnjax.core import stats

__all__ = [
    "KernelConfig",
    "batch_moments",
    "normalize",
]

Array = jax.Array

_SAVED_NAMES = ("bnjax_batch_mean", "bnjax_batch_inv", "bnjax_batch_count")


class KernelConfig(NamedTuple):
    """Static options of the kernel (hashable, so they can be a nondiff argument).

    `epsilon` None means epsilon is traced and passed to `normalize` as an operand instead.
    """

    reduction_axes: tuple[int, ...]
    epsilon: float | None
    axis_name: object = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


def batch_moments(x: Array, mask: Array | None, config: KernelConfig) -> stats.Moments:
    """Moments over the reduction axes, merged across devices when `config.axis_name` is set.

    On one device the mean is summed around a value of the data (`stats.centered_moments`):
    exact for a constant channel, about an ulp of |mean| at |mean| = 1000 std.
    """
    if config.axis_name is None:
        return stats.centered_moments(x, config.reduction_axes, mask)
    return stats.reduce_moments(
        x, config.reduction_axes, mask, config.axis_name, config.axis_index_groups
    )


def _statistics(x, mask, epsilon, config):
    batch = batch_moments(x, mask, config)
    var = batch.m2 / jnp.maximum(batch.count, 1)
    if config.epsilon is not None:
        epsilon = config.epsilon
    else:
        epsilon = epsilon.astype(var.dtype)
    inv = stats.inverse_root(batch.count, var, epsilon)  # 0 for an all-masked channel
    # The output's x - mean must not be the very value the variance pass reduced: XLA:CPU
    # would then compute that full-size broadcast once and store it for both users, an extra
    # float32 copy of x. The barrier costs nothing at run time; each loop fuses its own.
    mean = lax.optimization_barrier(batch.mean)
    names = _SAVED_NAMES
    return (
        checkpoint_name(mean, names[0]),
        var,
        checkpoint_name(inv, names[1]),
        checkpoint_name(batch.count, names[2]),
    )


def _normalized(x, mean, inv):
    # (x - mu) first: x and mu are close when |mu| >> std, so the difference is exact in float32,
    # whereas folding mu into the bias would round it at the scale of |mu|.
    return (x.astype(mean.dtype) - mean) * inv


def _output(x, mean, inv, scale, bias):
    """``y = (x - mu) * (scale * inv) + bias`` in x's dtype.

    The gain ``scale * inv`` is a per-channel product, so the full-size loop does one subtract,
    one multiply and one add per value (as flax's); ``x_hat * scale`` would add a second
    full-size multiply, measurably slower on CPU (about 6% of the forward). Both round the
    same number of times per value.
    """
    return _normalized(x, mean, scale * inv) + bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _normalize_with_batch_stats(x, scale, bias, mask, epsilon, config: KernelConfig):
    mean, var, inv, count = _statistics(x, mask, epsilon, config)
    return _output(x, mean, inv, scale, bias).astype(x.dtype), mean, var, count


@_normalize_with_batch_stats.defjvp
def _normalize_jvp(config, primals, tangents):
    x, scale, bias, mask, epsilon = primals
    t_x, t_scale, t_bias, _, t_epsilon = tangents
    mean, var, inv, count = _statistics(x, mask, epsilon, config)
    x_hat = _normalized(x, mean, inv)
    # y from x_hat itself, not `_output`: a second full-size expression of x would make XLA
    # keep a float32 copy of x_hat for the backward pass (measured: 32 MiB at 128x32x32x64).
    y = (x_hat * scale + bias).astype(x.dtype)

    t_x = t_x.astype(inv.dtype)
    t_valid = t_x if mask is None else jnp.where(mask, t_x, 0)
    # A second x_hat from barrier-separated statistics: in the transposed (backward) program
    # one copy feeds a reduction and the other an elementwise loop, so XLA fuses each into its
    # consumer instead of storing one full-size x_hat for both.
    x_hat_for_sums = _normalized(x, *lax.optimization_barrier((mean, inv)))
    axes = config.reduction_axes
    sums = (
        jnp.sum(t_valid, axis=axes, keepdims=True),
        jnp.sum(t_valid * x_hat_for_sums, axis=axes, keepdims=True),
    )
    if config.axis_name is not None:
        sums = lax.psum(sums, config.axis_name, axis_index_groups=config.axis_index_groups)
    safe_count = jnp.maximum(count, 1)
    t_mean, u = sums[0] / safe_count, sums[1] / safe_count
    gain = scale * inv
    # x_hat enters once, through a per-channel coefficient, so the backward needs a single
    # reduction sum(dy * x_hat) for both dscale and the statistics term. gain is distributed
    # over (t_x - t_mean) so that the transpose reduces dy itself (shared with dbias) instead
    # of a full-size gain * dy that XLA:CPU would store and reduce separately.
    x_hat_coefficient = t_scale - gain * u
    if config.epsilon is None:  # a traced epsilon: d inv / d epsilon = -inv^3 / 2
        x_hat_coefficient = x_hat_coefficient - 0.5 * scale * jnp.square(inv) * t_epsilon
    t_y = x_hat * x_hat_coefficient + (gain * t_x - gain * t_mean) + t_bias
    t_var = 2 * u / inv
    return (y, mean, var, count), (t_y.astype(x.dtype), t_mean, t_var, jnp.zeros_like(count))


def normalize(x, scale, bias, mask, config: KernelConfig, epsilon=None):
    """Normalizes `x` with its own (masked, possibly cross-device) statistics.

    Args:
      x: input of any floating dtype.
      scale: float array broadcastable to `x` with size 1 on the reduction axes.
      bias: float array broadcastable to `x` with size 1 on the reduction axes.
      mask: None, or a boolean array broadcastable to `x` (False = not in the statistics).
      config: the static KernelConfig.
      epsilon: the (traced) scalar epsilon when `config.epsilon` is None; else None.

    Returns:
      (y, mean, var, count): y has x's dtype; mean, biased var and count have x's shape with
      size 1 on the reduction axes, in float32 (float64 for float64 x).
    """
    if (config.epsilon is None) != (epsilon is not None):
        raise ValueError("Pass epsilon either in `config` (static) or as `epsilon` (traced).")
    if epsilon is not None:
        epsilon = jnp.asarray(epsilon)
    if jnp.iscomplexobj(x):
        # Complex inputs (flax's semantics: variance E|x - mean|^2, real) take plain autodiff;
        # the hand-written derivative above is for real values.
        mean, var, inv, count = _statistics(x, mask, epsilon, config)
        return _output(x, mean, inv, scale, bias).astype(x.dtype), mean, var, count
    return _remat(x, scale, bias, mask, epsilon, config)


@functools.partial(
    jax.checkpoint,
    policy=jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES),
    static_argnums=(5,),
    prevent_cse=False,
)
def _remat(x, scale, bias, mask, epsilon, config):
    return _normalize_with_batch_stats(x, scale, bias, mask, epsilon, config)
