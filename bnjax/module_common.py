"""What the linen and NNX frontends share: flax's dtype rule, flax's axis checks, the mode flag.

Both frontends are thin adapters over the core; these helpers translate flax's conventions
(output dtype promotion, instance norm's feature axes) so that the two files cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from bnjax.core.checks import as_flag, normalize_axes


def promote(x, scale, bias, dtype) -> tuple[jax.Array, Any]:
    """(input for the core, output dtype), flax's dtype rule: `dtype`, else promote x and params.

    The core returns its input's dtype, so the input is widened (exactly) when the output is
    wider; a narrower output is a cast of the core's result, with statistics from the full x.
    """
    x = jnp.asarray(x)
    out_dtype = canonicalize_dtype(x, scale, bias, dtype=dtype)
    return x.astype(jnp.promote_types(x.dtype, out_dtype)), out_dtype


def check_instance_feature_axes(feature_axes, ndim: int) -> None:
    """InstanceNorm's `feature_axes` must leave out axis 0, the batch axis (flax's words)."""
    if 0 in normalize_axes(feature_axes, ndim, "feature_axes"):
        raise ValueError(
            f"The channel axes cannot include the leading dimension as this is assumed to be "
            f"the batch axis. Got feature_axes={feature_axes!r}; NHWC uses -1, NCHW uses 1."
        )


def check_use_running_average(value) -> bool | None:
    """`use_running_average` (a field, an attribute or a call argument) as a Python bool, None
    when unset. A string such as 'False' is truthy, so flax would read it as True without a
    word; only True/False (or a concrete NumPy/JAX bool scalar) are accepted."""
    if value is None:
        return None
    return as_flag(
        value,
        "`use_running_average`",
        "it selects batch or running statistics. Got a traced value; pass a Python bool "
        "(a static argument under jit), or branch with lax.cond around two calls.",
        " True evaluates with the running statistics, False trains with the batch's.",
    )
