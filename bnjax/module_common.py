"""What the linen and NNX frontends share: flax's dtype rule and flax's axis checks.

Both frontends are thin adapters over the core; these helpers translate flax's conventions
(output dtype promotion, instance norm's feature axes) so that the two files cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from bnjax.core.checks import normalize_axes


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
