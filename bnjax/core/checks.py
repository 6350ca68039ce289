"""Argument and state checks shared by the normalizers.

Every check runs at trace time on static shapes, dtypes and Python values, so a mistake fails
once, before any compilation, with an error that names the argument and says how to fix it.
Values are read only when they are already known at trace time (`is_known`: Python and NumPy
numbers, concrete arrays, also closed over inside jit, vmap, pmap or shard_map); traced values
pass unchecked (`known_values` is the one rule). The one run-time check, for running
statistics that come in non-finite, is `bnjax.core.state_guard`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(x, name: str = "x") -> None:
    """Raises TypeError unless `x` has a floating-point or complex dtype (normalizing integers
    is a bug). Complex values are normalized as flax does: the variance is ``E|x - mean|^2``."""
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"`{name}` must have a floating-point (or complex) dtype, got {dtype}. "
            f"Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def broadcast_mask(mask, x) -> jax.Array | None:
    """`mask` as a boolean array of x's shape, by NumPy broadcasting (flax's rule).

    A mask marks the values that enter the statistics. It broadcasts against `x` from the
    trailing axes, as in flax: a (C,) mask marks features, and a per-example mask for x of
    shape (N, ..., C) is written ``mask[:, None, ..., None]`` (or ``mask.reshape(N, 1, ...)``).
    Integer masks count as nonzero = True, as in flax.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(
            f"`mask` must be boolean (True: the value enters the statistics), got dtype "
            f"{mask.dtype}; pass a boolean, e.g. `mask > 0`."
        )
    try:
        return jnp.broadcast_to(mask.astype(bool), x.shape)
    except ValueError:
        per_example = ""
        if mask.ndim == 1 and x.ndim > 1 and mask.shape[0] == x.shape[0]:
            per_example = (
                f" A per-example mask of shape ({x.shape[0]},) is written "
                f"mask.reshape({x.shape[0]}, {', '.join(['1'] * (x.ndim - 1))}), as in flax."
            )
        raise ValueError(
            f"`mask` of shape {tuple(mask.shape)} does not broadcast to x.shape="
            f"{tuple(x.shape)} (NumPy rules: trailing axes align).{per_example}"
        ) from None


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (
        hasattr(value, "dtype") and np.ndim(value) == 0 and value.dtype == np.bool_
    )


def as_int(value, name: str) -> int:
    """`value` as a Python int: ints, NumPy integers and concrete integer scalars pass; bools
    (an int subclass, so True would silently mean 1), floats and traced values raise."""
    if _is_bool(value):
        raise TypeError(f"`{name}` must be an int, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be an int known at trace time (it fixes shapes), got a traced "
            f"value; pass it as a Python int (a static argument under jit)."
        )
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {value!r}.") from None


def as_flag(value, name: str, traced_hint: str, hint: str = "") -> bool:
    """`value` as a Python bool: True/False, or a concrete NumPy/JAX bool scalar. Anything
    else raises a TypeError naming `name`: a string such as 'False' is truthy, and an int or
    None would be read as a bool without saying so. `traced_hint` says what to do instead of
    a traced value; `hint` is added to the message for other values."""
    if isinstance(value, bool):
        return value
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be True or False, known at trace time: {traced_hint}")
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).{hint}")


def check_training(training) -> bool:
    """`training` as a Python bool: True/False, or a concrete NumPy/JAX bool scalar."""
    return as_flag(
        training,
        "training",
        "it selects a different computation (batch or running statistics). Got a traced "
        "value; pass a Python bool (a static argument under jit), or branch with lax.cond "
        "around two calls.",
        " (use_running_average=True, as in flax, is training=False.)",
    )


def check_option_flag(value, name: str) -> bool:
    """A bool option that changes what is computed (e.g. `use_unbiased_running_var`)."""
    return as_flag(
        value,
        f"`{name}`",
        "it changes the computation; pass a Python bool (a static argument under jit).",
    )


def normalize_axes(axes: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Turns an int or a sequence of ints into sorted, non-negative, unique axis indices."""
    if isinstance(axes, (list, tuple, range)) or (isinstance(axes, np.ndarray) and axes.ndim == 1):
        raw = tuple(axes)
    else:
        raw = (axes,)
    if not raw:
        raise ValueError(f"`{name}` must name at least one axis, got {axes!r}.")
    result = []
    for axis in raw:
        if _is_bool(axis) or not isinstance(axis, (int, np.integer)):
            raise TypeError(
                f"`{name}` must be an int or a sequence of ints (e.g. -1 or (1, 2)), got {axes!r}."
            )
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"`{name}`={axes!r} is out of range for an input with {ndim} dimensions "
                f"(valid axes are {-ndim}..{ndim - 1})."
            )
        result.append(int(axis) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"`{name}`={axes!r} names the same axis twice.")
    return tuple(sorted(result))


def as_param(param, name: str):
    """A scale or bias as an array: arrays pass as they are, a Python list or tuple of numbers
    becomes a float array (float32; float64 under x64), None stays None."""
    if param is None or (hasattr(param, "shape") and hasattr(param, "dtype")):
        return param
    if isinstance(param, (list, tuple)):
        try:
            values = np.asarray(param, dtype=float)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`{name}` must be an array of numbers, got {param!r}.") from error
        return jnp.asarray(values, jax.dtypes.canonicalize_dtype(jnp.float64))
    raise TypeError(
        f"`{name}` must be an array with the feature shape (or None), got {param!r} "
        f"({type(param).__name__})."
    )


def check_param_shape(
    param, expected: tuple[int, ...], name: str, axes_name: str, *, input_dtype
) -> None:
    """Checks that a scale or bias has the shape of the input along the feature axes, and is
    real when the input (of `input_dtype`) is real: the output has the input's dtype, so a
    complex parameter would lose its imaginary part without a word."""
    if param is None:
        return
    check_floating(param, name)
    if jnp.iscomplexobj(param) and not jnp.issubdtype(input_dtype, jnp.complexfloating):
        raise TypeError(
            f"`{name}` is complex ({param.dtype}) but x is real ({np.dtype(input_dtype)}): the "
            f"output has x's dtype, so the imaginary part of `{name}` would be dropped. Pass "
            f"a real {name} (e.g. `{name}.real`), or a complex x."
        )
    if tuple(param.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` has shape {tuple(param.shape)} but the input has shape {expected} along "
            f"`{axes_name}`; pass a {name} of shape {expected} (or None)."
        )


def is_known(value) -> bool:
    """True when `value` is known at trace time and this process can read all of it: a Python
    or NumPy value (a nested list of them too), or a concrete jax.Array that is fully
    addressable or fully replicated (also when it is closed over inside jit, vmap, pmap or
    shard_map). False for traced values (a list holding one included) and for arrays spread
    over other processes' devices."""
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, jax.Array):
        return value.is_fully_addressable or value.sharding.is_fully_replicated
    if isinstance(value, (list, tuple)):
        return all(is_known(item) for item in value)
    return True


def known_values(*values) -> tuple[np.ndarray | None, ...] | None:
    """Each of `values` as a NumPy array, read from the devices together, when every one is
    known at trace time (`is_known`); None when any of them is not.

    This is bnjax's one "is this concrete?" rule: every check that reads a value (an epsilon,
    a bound, running statistics, a norm's statistics before folding) goes through here, so a
    value is either read by all of them or by none. A None entry (an absent parameter, e.g. a
    norm without scale) has nothing to read: it stays None and does not make the others
    unknown.
    """
    present = [value for value in values if value is not None]
    if not all(is_known(value) for value in present):
        return None
    # NumPy, not a jitted reduction: inside shard_map even a compile-time evaluation of a
    # closed-over array is staged out, whereas reading a concrete array works anywhere.
    read = iter(jax.device_get(present))
    return tuple(None if value is None else np.asarray(next(read)) for value in values)


def _shown(value, concrete: np.ndarray) -> str:
    """A readable value for messages: 1.5 rather than Array(1.5, dtype=float32, ...)."""
    return repr(concrete.item()) if concrete.ndim == 0 else repr(value)


def _check_number(value, name: str) -> np.ndarray | None:
    """The concrete value of a numeric option (None when traced); TypeError for a bool or a
    non-number."""
    if _is_bool(value):
        raise TypeError(f"`{name}` must be a number, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
        if not jnp.issubdtype(value.dtype, jnp.number):
            raise TypeError(f"`{name}` must be a number, got a traced {value.dtype} value.")
        return None
    if value is None:  # an absent value is "unknown" to `known_values`; here it is wrong
        raise TypeError(f"`{name}` must be a real number, got None.")
    known = known_values(value)
    if known is None:
        return None
    (concrete,) = known
    if not np.issubdtype(concrete.dtype, np.number) or np.issubdtype(
        concrete.dtype, np.complexfloating
    ):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    return concrete


def check_epsilon(epsilon) -> None:
    """Raises unless `epsilon` is a scalar and, when known at trace time, finite and > 0.

    epsilon = 0 turns a constant channel (variance 0) into a division by zero: inf outputs and
    NaN gradients. A traced epsilon is not checked.
    """
    concrete = _check_number(epsilon, "epsilon")
    if np.ndim(epsilon) != 0:
        raise TypeError(f"`epsilon` must be a scalar, got shape {np.shape(epsilon)}.")
    if concrete is None:
        return
    value = float(concrete)
    if not math.isfinite(value):
        raise ValueError(f"`epsilon` must be finite and > 0 (e.g. 1e-5), got {value}.")
    if value <= 0:
        raise ValueError(
            f"`epsilon` must be >= 0 and nonzero (e.g. 1e-5), got {value}: with 0 a "
            f"constant channel (variance 0) is divided by 0, giving inf outputs and NaN "
            f"gradients."
        )


def check_in_range(value, name: str, low: float, high: float = math.inf, why: str = "") -> None:
    """Raises for a concrete `value` (any scalar or array known at trace time) outside
    [low, high] (NaN included); a traced value is not checked."""
    concrete = _check_number(value, name)
    if concrete is None:
        return
    if not np.all((concrete >= low) & (concrete <= high)):  # also rejects NaN
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bounds}{why}, got {_shown(value, concrete)}.")


def check_momentum(momentum, name: str = "momentum", allow_none: bool = True) -> None:
    """Raises for a concrete `momentum` outside [0, 1]; None (cumulative average) is fine."""
    if momentum is None and allow_none:
        return
    if momentum is None:
        raise ValueError(f"`{name}` must be in [0, 1], got None.")
    concrete = _check_number(momentum, name)
    if concrete is not None and not np.all((concrete >= 0.0) & (concrete <= 1.0)):
        raise ValueError(
            f"`{name}` is the decay of the running average and must be in [0, 1]"
            + (" or None (cumulative average)" if allow_none else "")
            + f", got {_shown(momentum, concrete)}. PyTorch's momentum=0.1 is bnjax's 0.9."
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


# ------------------------------------------------------------------ running statistics

STATISTICS_DTYPES = (
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype(np.complex128),
)
"""The dtypes running statistics may have (bfloat16/float16 statistics lose the variance;
complex means come from complex inputs)."""


def check_statistics(state, fields, feature_shape, axis, factory: str) -> None:
    """Raises unless each of `fields` of `state` is an array of `feature_shape` in float32 or
    float64 (`factory` names the function that makes a good state)."""
    for field in fields:
        value = getattr(state, field)
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"`state.{field}` must be an array, got {type(value).__name__}; create the "
                f"state with bnjax.{factory}({feature_shape})."
            )
        shape = tuple(jnp.shape(value))
        if shape != feature_shape:
            raise ValueError(
                f"`state.{field}` has shape {shape} but the input has {feature_shape} features "
                f"along axis={axis!r}; create it with bnjax.{factory}({feature_shape}) or "
                f"fix `axis` (NHWC uses axis=-1, NCHW uses axis=1)."
            )
        if np.dtype(value.dtype) not in STATISTICS_DTYPES:
            raise TypeError(
                f"`state.{field}` has dtype {value.dtype}, but running statistics must be "
                f"float32 (float64 under x64); create the state with bnjax.{factory}("
                f"{feature_shape}) or cast it, e.g. `state._replace({field}=state.{field}"
                f".astype(jnp.float32))`."
            )


def as_counters(state, fields, factory: str):
    """`state` with the integer counters `fields` as integer arrays (a Python or NumPy int, e.g.
    ``BatchNormState(mean, var, 0, 0)``, becomes an int32 scalar); TypeError for others."""
    converted = {}
    for field in fields:
        value = getattr(state, field)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            converted[field] = jnp.asarray(value, jnp.int32)
        elif not (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(
                f"`state.{field}` must be an integer counter (an int32 scalar), got {value!r}; "
                f"create the state with bnjax.{factory}."
            )
        elif np.ndim(value) != 0:
            # One counter per layer: an array would broadcast into every update and come back
            # as an array of counts, which no reader of the state expects.
            raise ValueError(
                f"`state.{field}` must be a scalar (one int32 counter per layer), got shape "
                f"{tuple(np.shape(value))}; create the state with bnjax.{factory} (under vmap, "
                f"map over the stacked states instead of passing them whole)."
            )
    return state._replace(**converted) if converted else state


def group_count(channels: int, num_groups, group_size, axis) -> int:
    """The number of channel groups from exactly one of `num_groups` and `group_size` (group
    norm's and EvoNorm-S0's options), each of which must divide the `channels` of `axis`;
    otherwise a ValueError naming the argument and the divisors."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"Give exactly one of `num_groups` and `group_size` (got num_groups={num_groups}, "
            f"group_size={group_size}); e.g. num_groups=None to use group_size."
        )
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    if group_size is not None:
        group_size = as_int(group_size, "group_size")
        if group_size < 1 or channels % group_size:
            raise ValueError(
                f"`group_size`={group_size} must divide the {channels} channels of axis "
                f"{axis}; divisors are {divisors}."
            )
        num_groups = channels // group_size
    num_groups = as_int(num_groups, "num_groups")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"`num_groups`={num_groups} must divide the {channels} channels of axis {axis}; "
            f"divisors are {divisors}."
        )
    return num_groups
