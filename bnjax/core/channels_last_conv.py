"""Channels-last layers that are linear in their kernel, as `conv` for cross-iteration BN.

`bnjax.cross_iteration_batch_norm` normalizes ``conv(inputs, kernel)`` and differentiates it
with respect to the kernel; these two build that function with flax's layouts and options.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks

__all__ = ["convolution", "dense"]

Array = jax.Array


def dense(inputs: Array, kernel: Array) -> Array:
    """``inputs @ kernel`` over the last axis: (..., C_in) x (C_in, C) -> (..., C)."""
    return jnp.matmul(inputs, kernel)


def _pairs(value, spatial: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of `spatial` ints (flax's shorthand) as a tuple of ints."""
    values = (value,) * spatial if isinstance(value, int) else tuple(value)
    if len(values) != spatial:
        raise ValueError(f"`{name}` must be an int or {spatial} ints, got {value!r}.")
    return tuple(checks.as_int(v, name) for v in values)


def convolution(
    spatial: int,
    *,
    strides=1,
    padding="SAME",
    input_dilation=1,
    kernel_dilation=1,
    feature_group_count: int = 1,
) -> Callable[[Array, Array], Array]:
    """A channels-last convolution ``conv(inputs, kernel)`` with flax's options and layout.

    inputs (N, *spatial, C_in), kernel (*window, C_in / groups, C) (flax's HWIO), output
    (N, *spatial', C). `padding` is 'SAME', 'VALID', an int, or per spatial axis an int or a
    (low, high) pair, as in flax.linen.Conv ('CIRCULAR' is not supported).

    Example:
      >>> conv = convolution(2, strides=2)
      >>> conv(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8))).shape
      (1, 2, 2, 8)
    """
    spatial = checks.as_int(spatial, "spatial")
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"`padding`={padding!r}: cross-iteration batch norm's conv takes 'SAME', "
                f"'VALID', ints or (low, high) pairs."
            )
        pads = padding.upper()
    else:
        per_axis = (padding,) * spatial if isinstance(padding, int) else tuple(padding)
        if len(per_axis) != spatial:
            raise ValueError(f"`padding` must give {spatial} axes, got {padding!r}.")
        pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in per_axis)
    letters = "DHW"[-spatial:] if spatial <= 3 else None
    if letters is None:
        raise ValueError(f"`spatial` must be 1, 2 or 3 axes, got {spatial}.")
    numbers = (f"N{letters}C", f"{letters}IO", f"N{letters}C")

    def conv(inputs: Array, kernel: Array) -> Array:
        return lax.conv_general_dilated(
            inputs,
            kernel,
            _pairs(strides, spatial, "strides"),
            pads,
            lhs_dilation=_pairs(input_dilation, spatial, "input_dilation"),
            rhs_dilation=_pairs(kernel_dilation, spatial, "kernel_dilation"),
            dimension_numbers=numbers,
            feature_group_count=feature_group_count,
        )

    return conv
