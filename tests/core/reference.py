"""Plain reference implementations the tests compare against.

Written the obvious way (no custom derivative, no fusion tricks) so that autodiff of them is the
ground truth for bnjax's hand-written derivative rule. Use them in float64.
"""

import jax.numpy as jnp
import numpy as np


def batch_norm_train(x, scale, bias, *, epsilon, reduction_axes, mask=None):
    """y = scale * (x - mu) / sqrt(var + eps) + bias with masked, biased batch statistics."""
    if mask is None:
        mask = jnp.ones_like(x, dtype=bool)
    mask = jnp.broadcast_to(mask, x.shape)
    weights = mask.astype(x.dtype)
    count = jnp.sum(weights, axis=reduction_axes, keepdims=True)
    mean = jnp.sum(weights * x, axis=reduction_axes, keepdims=True) / count
    var = jnp.sum(weights * (x - mean) ** 2, axis=reduction_axes, keepdims=True) / count
    return scale * (x - mean) / jnp.sqrt(var + epsilon) + bias, mean, var, count


def numpy_moments(x, reduction_axes, mask=None):
    """Float64 mean, biased and unbiased variance per channel of the valid values."""
    x = np.asarray(x, np.float64)
    if mask is None:
        mask = np.ones(x.shape, bool)
    mask = np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = mask.sum(axis=reduction_axes)
    mean = np.where(mask, x, 0).sum(axis=reduction_axes) / count
    mean_b = np.expand_dims(mean, reduction_axes)
    m2 = np.where(mask, (x - mean_b) ** 2, 0).sum(axis=reduction_axes)
    return mean, m2 / count, m2 / (count - 1)
