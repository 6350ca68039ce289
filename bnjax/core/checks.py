"""Argument checks shared by the normalizers.

Every check runs at trace time on static shapes and dtypes, so a mistake fails once, before any
compilation, with an error that names the argument and says how to fix it. Nothing here touches
array values.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(x, name: str = "x") -> None:
    """Raises TypeError unless `x` has a floating-point dtype (normalizing integers is a bug)."""
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating-point dtype, got {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def normalize_axes(axes: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Turns an int or a sequence of ints into sorted, non-negative, unique axis indices."""
    raw = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    if not raw:
        raise ValueError(f"`{name}` must name at least one axis, got {axes!r}.")
    result = []
    for axis in raw:
        if not isinstance(axis, (int, np.integer)):
            raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"`{name}`={axes!r} is out of range for an input with {ndim} dimensions "
                f"(valid axes are {-ndim}..{ndim - 1})."
            )
        result.append(int(axis) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"`{name}`={axes!r} names the same axis twice.")
    return tuple(sorted(result))


def check_param_shape(param, expected: tuple[int, ...], name: str, axes_name: str) -> None:
    """Checks that a scale or bias has the shape of the input along the feature axes."""
    if param is None:
        return
    check_floating(param, name)
    if tuple(param.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` has shape {tuple(param.shape)} but the input has shape {expected} along "
            f"`{axes_name}`; pass a {name} of shape {expected} (or None)."
        )


def _is_concrete_scalar(value) -> bool:
    """A Python or NumPy number (or 0-d array) whose value is known at trace time."""
    if isinstance(value, jax.core.Tracer):
        return False
    return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)


def check_epsilon(epsilon) -> None:
    """Raises for a concrete negative `epsilon` (a traced one is not checked)."""
    if _is_concrete_scalar(epsilon) and float(epsilon) < 0:
        raise ValueError(f"`epsilon` must be >= 0, got {epsilon}.")


def check_momentum(momentum) -> None:
    """Raises for a concrete `momentum` outside [0, 1]; None (cumulative average) is fine."""
    if momentum is None:
        return
    if _is_concrete_scalar(momentum) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"`momentum` is the decay of the running average and must be in [0, 1] or None "
            f"(cumulative average), got {momentum}. PyTorch's momentum=0.1 is bnjax's 0.9."
        )


def check_axis_name(axis_name, axis_index_groups) -> None:
    """Raises when `axis_index_groups` is given without the `axis_name` it groups."""
    if axis_index_groups is not None and axis_name is None:
        raise ValueError(
            "`axis_index_groups` needs `axis_name`: name the mapped axis to group over."
        )


def check_not_single_value(num_values: int, where: str, hint: str) -> None:
    """Statistics over one value give variance 0 and erase the input: refuse instead."""
    if num_values == 1:
        raise ValueError(
            f"{where} would compute each statistic from a single value (the output would be "
            f"the bias alone, whatever the input). {hint}"
        )
