"""What the linen and NNX frontends share: flax's dtype rule and flax's axis options.

Both frontends are thin adapters over the core; these helpers translate flax's conventions
(output dtype promotion, `reduction_axes` / `feature_axes` for group and instance norm, options
the core does not support) so that the two files cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from bnjax.core import group_norm, instance_norm, layer_norm
from bnjax.core.checks import normalize_axes


def promote(x, scale, bias, dtype) -> tuple[jax.Array, Any]:
    """(input for the core, output dtype), flax's dtype rule: `dtype`, else promote x and params.

    The core returns its input's dtype, so the input is widened (exactly) when the output is
    wider; a narrower output is a cast of the core's result, with statistics from the full x.
    """
    x = jnp.asarray(x)
    out_dtype = canonicalize_dtype(x, scale, bias, dtype=dtype)
    return x.astype(jnp.promote_types(x.dtype, out_dtype)), out_dtype


def refuse(module: str, **options) -> None:
    """Raises a ValueError naming the first flax option in `options` that is set."""
    for name, value in options.items():
        if value is not None:
            raise ValueError(
                f"bnjax {module} does not support `{name}` yet (its statistics are per example "
                f"on one device); use flax's {module} for it, or leave `{name}` unset."
            )


def group_norm_flax_axes(x, scale, bias, *, num_groups, group_size, epsilon, reduction_axes):
    """`group_norm` with flax's `reduction_axes`: leading axes outside them act as the batch."""
    first = 1
    if reduction_axes is not None:
        axes = normalize_axes(reduction_axes, x.ndim, "reduction_axes")
        first = axes[0]
        if first == 0 or axes != tuple(range(first, x.ndim)):
            raise ValueError(
                f"bnjax GroupNorm reduces over trailing axes ending with the channel axis, "
                f"e.g. {tuple(range(1, x.ndim))}; got reduction_axes={reduction_axes}."
            )
    flat = x.reshape((math.prod(x.shape[:first]), *x.shape[first:]))
    y = group_norm(flat, scale, bias, num_groups=num_groups, group_size=group_size, epsilon=epsilon)
    return y.reshape(x.shape)


def instance_norm_flax_axes(x, scale, bias, *, epsilon, feature_axes):
    """`instance_norm`; several feature axes go through `layer_norm` (the same statistics)."""
    features = normalize_axes(feature_axes, x.ndim, "feature_axes")
    if 0 in features:
        raise ValueError("`feature_axes` must not include the batch axis 0.")
    if len(features) == 1:
        return instance_norm(x, scale, bias, epsilon=epsilon, axis=features[0])
    spatial = tuple(a for a in range(1, x.ndim) if a not in features)
    return layer_norm(
        x, scale, bias, epsilon=epsilon, reduction_axes=spatial, feature_axes=features
    )
