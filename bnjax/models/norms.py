"""The `norm` choice every bundled model takes, turned into a Flax module.

    'batch'         bnjax.linen.BatchNorm      statistics over batch and space, per channel
    'batch_renorm'  bnjax.linen.BatchRenorm    same, corrected toward running statistics
    'group'         bnjax.linen.GroupNorm      per example, `groups` channel groups + space
    'layer'         bnjax.linen.LayerNorm      per example, over every non-batch axis
    'instance'      bnjax.linen.InstanceNorm   per example and channel, over space
    'none'          identity                   (layers before it then carry a bias)

Models call ``apply_norm(make_norm(...), x, mask)`` after each conv/dense; in training mode
batch-statistics norms update 'batch_stats', so apply with ``mutable=['batch_stats']`` as with
flax. The models' optional per-example `mask` (N,) reaches the batch-statistics norms only
(padding rows then stay out of the batch statistics); the other norms are per example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bnjax import linen as bnn


def _instance(train, spatial, groups, options):
    if not spatial:
        raise ValueError("`norm`='instance' needs spatial axes; use 'layer' for an MLP.")
    return bnn.InstanceNorm(**options)


# The registry: name -> build(train, spatial, groups, module options). Its keys are the valid
# `norm` values. (`bnn` is looked up when a norm is built, so the benchmarks can swap it.)
NORMS = {
    "batch": lambda train, spatial, groups, options: bnn.BatchNorm(
        use_running_average=not train, **options
    ),
    "batch_renorm": lambda train, spatial, groups, options: bnn.BatchRenorm(
        use_running_average=not train, **options
    ),
    "group": lambda train, spatial, groups, options: bnn.GroupNorm(num_groups=groups, **options),
    "layer": lambda train, spatial, groups, options: bnn.LayerNorm(
        reduction_axes=(1, 2, 3) if spatial else -1, feature_axes=-1, **options
    ),
    "instance": _instance,
    "none": lambda train, spatial, groups, options: _identity,
}
BATCH_STATISTICS_NORMS = ("batch", "batch_renorm")


def _identity(x, **unused):
    return x


def check_norm(norm: str) -> None:
    """Raises a ValueError naming `norm` unless it is one of `NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"`norm`={norm!r} is not one of {tuple(NORMS)}.")


def uses_bias_before_norm(norm: str) -> bool:
    """A layer followed by a norm needs no bias: the norm's shift (or mean removal) absorbs it."""
    return norm == "none"


def apply_norm(layer, x, mask=None):
    """`layer(x)` for a layer from `make_norm`, with the per-example `mask` (N,) of booleans
    passed to batch-statistics norms as an (N, 1, ..., 1) mask (per-example norms need none).

    Example:
      >>> layer = make_norm("batch", train=True, spatial=False)
      >>> x = jnp.array([[1.0], [3.0], [100.0]])
      >>> keep = jnp.array([True, True, False])                 # the last row is padding
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, _ = layer.apply(variables, x, mutable=["batch_stats"],
      ...                    method=lambda module, x: apply_norm(module, x, keep))
      >>> y[:2, 0].round(3).tolist()                    # statistics of the first two rows
      [-1.0, 1.0]
    """
    if mask is None or not isinstance(layer, (bnn.BatchNorm, bnn.BatchRenorm)):
        return layer(x)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:1] or mask.dtype != jnp.bool_:
        raise ValueError(
            f"`mask` must be a boolean array of shape ({x.shape[0]},), one flag per example, "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    return layer(x, mask=mask.reshape(mask.shape + (1,) * (x.ndim - 1)))


def make_norm(
    norm: str,
    *,
    train: bool,
    spatial: bool,
    groups: int = 8,
    zero_scale: bool = False,
    dtype: Any = None,
    options: Mapping[str, Any] | None = None,
    name: str | None = None,
):
    """A norm layer for activations of shape (N, H, W, C) (`spatial=True`) or (N, C).

    Args:
      norm: one of NORMS.
      train: training mode; batch-statistics norms then use and update batch statistics.
      spatial: whether the input has spatial axes (instance norm needs them).
      groups: channel groups for 'group' (must divide the channels).
      zero_scale: initialise the scale to 0 (last norm of a residual branch: the block starts
        as the identity, Goyal et al. 2017).
      dtype: computation/output dtype of the layer (None: from the input).
      options: extra keyword options for the norm module (e.g. momentum, axis_name).
      name: module name.

    Example:
      >>> norm = make_norm("batch", train=False, spatial=True, options={"momentum": 0.9})
      >>> type(norm).__name__, norm.use_running_average, norm.momentum
      ('BatchNorm', True, 0.9)
      >>> x = jnp.ones((2, 4, 4, 8))
      >>> make_norm("none", train=True, spatial=True)(x) is x                   # identity
      True
    """
    check_norm(norm)
    options = dict(options or {})
    if zero_scale:
        options["scale_init"] = nn.initializers.zeros
    return NORMS[norm](train, spatial, groups, dict(dtype=dtype, name=name, **options))
