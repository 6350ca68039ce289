"""Weight standardization and weight centralization: a kernel reparametrized per output channel.

For a kernel W whose last axis holds the output channels (flax's Conv (kh, kw, C_in, C_out),
Dense (D_in, D_out)), every output channel o is standardized over its fan-in F (by default
every other axis, I = |F| values):

    mean_o = (1 / I) * sum_{j in F} W[j, o]
    var_o  = (1 / I) * sum_{j in F} (W[j, o] - mean_o)^2                 (biased)
    standardize_weight:  W_hat[j, o] = (W[j, o] - mean_o) / sqrt(var_o + epsilon)
    centralize_weight:   W_hat[j, o] =  W[j, o] - mean_o

A layer that convolves with W_hat instead of W is weight-standardized (WS; Qiao et al.
2019), or, with the centralized kernel, the weight centralization that Moving Average Batch
Normalization pairs with its norm (Yan et al. 2020). The map is differentiable and the
gradient flows back to the stored W; the stored parameter is never changed.

The epsilon sits inside the square root, as in the WS paper's sigma (Section 3.1) and in BiT's
StdConv (Kolesnikov et al. 2020; its PyTorch code uses epsilon = 1e-10, its JAX code 1e-5,
the default here). WS's reference PyTorch code divides instead by the unbiased standard
deviation plus epsilon; with thousands of fan-in values the two differ by less than
1 / (2 I) relative, far below what training notices.

Statistics are float32 (float64 for float64 kernels) with the two-pass variance of
`bnjax.core.stats`, so a kernel whose mean is a thousand times its spread still standardizes
to float32 rounding; the result has the kernel's dtype (a bfloat16 kernel is standardized in
float32 and rounded once, at the end).

A `mask` (booleans of the kernel's shape, e.g. flax's masked convolutions' ``mask != 0``)
restricts the statistics to the entries it keeps and zeroes the others, so a masked kernel
stays masked and its hidden entries do not shift the mean.

References:
  Qiao, Wang, Liu, Shen & Yuille (2019), Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization, arXiv:1903.10520, Section 3.1: the equations of
  W_hat, mu_W and sigma_W (versions of the paper write the epsilon added to sigma or inside
  its square root; this module implements the latter, as BiT).
  Kolesnikov, Beyer, Zhai, Puigcerver, Yung, Gelly & Houlsby (2020), Big Transfer (BiT):
  General Visual Representation Learning, ECCV, arXiv:1912.11370 (GroupNorm + WS in every
  ResNet layer).
  Yan, Wan, Zhang, Zhang, Wei & Sun (2020), Towards Stabilizing Batch Statistics in Backward
  Propagation of Batch Normalization (MABN), ICLR, arXiv:2001.06838: weight centralization.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bnjax.core import checks, stats

__all__ = ["centralize_weight", "standardize_weight"]

Array = jax.Array


def _fan_in(kernel, fan_in_axes, mask, where: str):
    """Checked (kernel, fan-in axes, boolean mask or None)."""
    if not hasattr(kernel, "dtype"):
        kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f"`kernel` must have a real floating-point dtype, got {kernel.dtype}: {where} "
            f"rescales it. Cast it first, e.g. `kernel.astype(jnp.float32)`."
        )
    if kernel.ndim < 2:
        raise ValueError(
            f"`kernel` must have rank >= 2 (fan-in axes, then the output channels last: Conv "
            f"(kh, kw, C_in, C_out), Dense (D_in, D_out)), got shape {tuple(kernel.shape)}."
        )
    if fan_in_axes is None:
        axes = tuple(range(kernel.ndim - 1))
    else:
        axes = checks.normalize_axes(fan_in_axes, kernel.ndim, "fan_in_axes")
    fan_in = 1
    for axis in axes:
        fan_in *= kernel.shape[axis]
    if fan_in < 2:
        raise ValueError(
            f"`kernel` of shape {tuple(kernel.shape)} has a fan-in of {fan_in} value(s) per "
            f"output channel over `fan_in_axes`={axes}: {where} would map every channel to "
            f"0. Use a plain layer here (e.g. flax's nn.Conv for a 1x1 conv on one channel)."
        )
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(
                f"`mask` must be boolean (True: the entry enters the statistics), got dtype "
                f"{mask.dtype}; for a multiplicative mask pass `mask != 0`."
            )
        if mask.shape != kernel.shape:
            raise ValueError(
                f"`mask` must have the kernel's shape {tuple(kernel.shape)}, got "
                f"{tuple(mask.shape)}."
            )
    return kernel, axes, mask


def _moments(kernel, axes, mask) -> stats.Moments:
    # The kernel enters in float32 (float64 for float64): the two-pass moments of the core.
    return stats.moments(kernel, axes, mask)


def _finish(centered, kernel, mask) -> Array:
    if mask is not None:
        centered = jnp.where(mask, centered, 0)
    return centered.astype(kernel.dtype)


def standardize_weight(
    kernel: Array,
    *,
    epsilon: float = 1e-5,
    fan_in_axes: int | Sequence[int] | None = None,
    mask: Array | None = None,
) -> Array:
    """The kernel standardized per output channel over its fan-in: zero mean, unit variance.

    ``W_hat = (W - mean) / sqrt(var + epsilon)`` with the (biased) mean and variance of each
    output channel over `fan_in_axes` (see the module docstring).

    Args:
      kernel: (..., C_out), floating, rank >= 2; e.g. Conv (kh, kw, C_in, C_out) or Dense
        (D_in, D_out).
      epsilon: added to the variance inside the square root (> 0; 1e-5 as BiT's JAX code).
      fan_in_axes: the axes each statistic runs over; None: every axis but the last.
      mask: optional booleans of the kernel's shape: only True entries enter the statistics;
        False entries come out as 0.

    Returns:
      W_hat with the kernel's shape and dtype.

    Raises:
      TypeError for a non-floating kernel or a non-boolean mask; ValueError for a kernel of
      rank < 2, a fan-in of one value, a mask of another shape, or a bad epsilon.

    Example:
      >>> w = jnp.array([[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]])        # (D_in=3, D_out=2)
      >>> w_hat = standardize_weight(w)
      >>> w_hat.mean(axis=0).round(6).tolist(), w_hat.var(axis=0).round(4).tolist()
      ([0.0, 0.0], [1.0, 1.0])
    """
    kernel, axes, mask = _fan_in(kernel, fan_in_axes, mask, "weight standardization")
    checks.check_epsilon(epsilon)
    moments = _moments(kernel, axes, mask)
    inv = stats.inverse_root(moments.count, moments.m2 / jnp.maximum(moments.count, 1), epsilon)
    centered = kernel.astype(moments.mean.dtype) - moments.mean
    return _finish(centered * inv, kernel, mask)


def centralize_weight(
    kernel: Array,
    *,
    fan_in_axes: int | Sequence[int] | None = None,
    mask: Array | None = None,
) -> Array:
    """The kernel minus its mean per output channel over the fan-in (weight centralization).

    ``W_hat = W - mean`` with the mean of each output channel over `fan_in_axes`; the scale
    of the kernel is kept (unlike `standardize_weight`).

    Args:
      kernel: (..., C_out), floating, rank >= 2.
      fan_in_axes: the axes each mean runs over; None: every axis but the last.
      mask: optional booleans of the kernel's shape: only True entries enter the mean;
        False entries come out as 0.

    Returns:
      W_hat with the kernel's shape and dtype.

    Example:
      >>> centralize_weight(jnp.array([[1.0, 2.0], [3.0, 6.0]])).tolist()
      [[-1.0, -2.0], [1.0, 2.0]]
    """
    kernel, axes, mask = _fan_in(kernel, fan_in_axes, mask, "weight centralization")
    moments = _moments(kernel, axes, mask)
    return _finish(kernel.astype(moments.mean.dtype) - moments.mean, kernel, mask)
