"""Where the features sit in a batch-norm input, seen as (ghost batch, example, ...).

Ghost batches of size g split axis 0 of x (N, ..., C) into N / g consecutive groups, each with
its own statistics: the kernel sees the grouped view (N / g, g, ..., C) and reduces every axis
but the ghost axis and the feature axes. Without ghost batches there is one group. Scale, bias
and statistics (feature shape) broadcast in the grouped view as `BatchLayout.param_shape`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnjax.core import checks

Array = jax.Array


class BatchLayout(NamedTuple):
    """Where the features sit in the (ghost, batch, ...) view of the input."""

    feature_axes: tuple[int, ...]  # of the original input
    feature_shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]  # (num_ghost, ghost_size, *x.shape[1:])
    reduction_axes: tuple[int, ...]  # of the grouped view: everything but ghost and features
    param_shape: tuple[int, ...]  # scale/bias/statistics broadcast shape in the grouped view


def batch_layout(x, axis, ghost_batch_size) -> BatchLayout:
    """The `BatchLayout` of `x` for feature `axis` and ghost batches of `ghost_batch_size`
    (None: one group); raises a ValueError naming the argument when they do not fit `x`."""
    feature_axes = checks.normalize_axes(axis, x.ndim, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    batch = x.shape[0]
    if ghost_batch_size is None:
        num_ghost = 1
    else:
        if 0 in feature_axes:
            raise ValueError("`ghost_batch_size` splits axis 0, so `axis` must not include 0.")
        try:
            ghost_batch_size = checks.as_int(ghost_batch_size, "ghost_batch_size")
        except TypeError as error:
            raise ValueError(
                f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}."
            ) from error
        if ghost_batch_size < 1:
            raise ValueError(
                f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}."
            )
        if batch % ghost_batch_size:
            raise ValueError(
                f"`ghost_batch_size`={ghost_batch_size} does not divide the batch of {batch} "
                f"(x.shape={tuple(x.shape)}); pick a divisor of {batch} or pad the batch and mask."
            )
        # An empty batch is one empty ghost batch: no statistics, as without ghost batches.
        num_ghost = max(batch // ghost_batch_size, 1)
    grouped_shape = (num_ghost, batch // num_ghost, *x.shape[1:])
    grouped_features = tuple(a + 1 for a in feature_axes)
    reduction_axes = tuple(a for a in range(1, x.ndim + 1) if a not in grouped_features)
    param_shape = tuple(
        grouped_shape[a] if a in grouped_features else 1 for a in range(len(grouped_shape))
    )
    return BatchLayout(feature_axes, feature_shape, grouped_shape, reduction_axes, param_shape)


def grouped_mask(mask, x, layout: BatchLayout) -> Array | None:
    """Brings a mask broadcastable to x (flax's rule, `checks.broadcast_mask`) into the grouped
    view, as booleans."""
    mask = checks.broadcast_mask(mask, x)
    return None if mask is None else mask.reshape(layout.grouped_shape)


def as_param(param, layout: BatchLayout, fill: float, dtype) -> Array:
    """A per-feature array (scale, bias, a statistic; feature shape) in `dtype`, reshaped to
    broadcast in the grouped view; None gives the constant `fill` instead."""
    if param is None:
        return jnp.full(layout.param_shape, fill, dtype)
    return param.astype(dtype).reshape(layout.param_shape)
