"""The argument checks of `domain_batch_norm`: its state, the domain indices, scale and bias.

Each raises naming the argument and the fix; they read values only when known at trace time
(`checks.known_values`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.core import checks

if TYPE_CHECKING:
    from bnjax.core.domain_batch_norm import DomainBatchNormState

Array = jax.Array
_FACTORY = "domain_batch_norm_state"


def check_state(state, feature_shape, axis) -> DomainBatchNormState:
    """`state`, its counters as int32, when it is a `DomainBatchNormState` whose
    statistics fit x's features along `axis`; otherwise a TypeError/ValueError naming `state`
    and the constructor that makes a fitting one."""
    from bnjax.core.domain_batch_norm import DomainBatchNormState

    if not isinstance(state, DomainBatchNormState):
        raise TypeError(
            f"`state` must be a DomainBatchNormState (from bnjax.domain_batch_norm_state), "
            f"got {type(state).__name__}."
        )
    mean_shape = tuple(np.shape(state.mean))
    if len(mean_shape) != len(feature_shape) + 1 or mean_shape[0] < 1:
        raise ValueError(
            f"`state.mean` has shape {mean_shape}, but a domain batch norm of {feature_shape} "
            f"features keeps (num_domains, *{feature_shape}); create it with "
            f"bnjax.domain_batch_norm_state(num_domains, {feature_shape})."
        )
    num_domains = mean_shape[0]
    checks.check_statistics(state, ("mean", "var"), (num_domains, *feature_shape), axis, _FACTORY)
    converted = {}
    for field in ("count", "skipped"):
        value = getattr(state, field)
        if not (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)):
            raise TypeError(
                f"`state.{field}` must be an int32 array of shape ({num_domains},), got "
                f"{value!r}; create the state with bnjax.{_FACTORY}."
            )
        if tuple(np.shape(value)) != (num_domains,):
            raise ValueError(
                f"`state.{field}` must have shape ({num_domains},), one counter per domain, "
                f"got {tuple(np.shape(value))}; create the state with bnjax.{_FACTORY}."
            )
        converted[field] = jnp.asarray(value, jnp.int32)
    return state._replace(**converted)


def check_domain(domain, batch: int, num_domains: int) -> Array:
    """`domain` as an int32 (N,) array: an integer array of shape (N,), or a scalar (every
    example in that domain). Raises naming `domain` for a wrong dtype or shape, and, when its
    values are known, for an index outside [0, num_domains)."""
    if domain is None:
        raise TypeError(
            "`domain` is required: an int array of shape (N,) with each example's domain index "
            "in [0, num_domains), or one int for the whole batch."
        )
    domain = jnp.asarray(domain) if not isinstance(domain, jax.core.Tracer) else domain
    if not jnp.issubdtype(domain.dtype, jnp.integer) or domain.dtype == jnp.bool_:
        raise TypeError(
            f"`domain` must hold integer domain indices, got dtype {domain.dtype}; pass e.g. "
            f"`domain.astype(jnp.int32)` (a boolean is_adversarial flag becomes domain 1)."
        )
    if domain.ndim == 0:
        domain = jnp.broadcast_to(domain, (batch,))
    if tuple(domain.shape) != (batch,):
        raise ValueError(
            f"`domain` must have shape ({batch},), one index per example of x's axis 0, or be a "
            f"scalar; got shape {tuple(domain.shape)}."
        )
    known = checks.known_values(domain)
    if known is not None and known[0].size:
        low, high = int(known[0].min()), int(known[0].max())
        if low < 0 or high >= num_domains:
            raise ValueError(
                f"`domain` holds indices in [{low}, {high}], outside [0, {num_domains}) for a "
                f"state of {num_domains} domains: create the state with "
                f"bnjax.domain_batch_norm_state({max(high + 1, num_domains)}, ...) or fix the "
                f"indices."
            )
    return domain.astype(jnp.int32)


def check_param(param, name, feature_shape, num_domains, x_dtype):
    """A shared (features) or per-domain (D, *features) scale or bias; returns it broadcast
    to (D, *features), or None."""
    param = checks.as_param(param, name)
    if param is None:
        return None
    per_domain = (num_domains, *feature_shape)
    expected = per_domain if tuple(param.shape) == per_domain else feature_shape
    if tuple(param.shape) not in (per_domain, tuple(feature_shape)):
        raise ValueError(
            f"`{name}` has shape {tuple(param.shape)}; a domain batch norm takes a shared "
            f"{name} of shape {tuple(feature_shape)} or one per domain of shape {per_domain}."
        )
    checks.check_param_shape(param, expected, name, "axis", input_dtype=x_dtype)
    return jnp.broadcast_to(param, per_domain)
