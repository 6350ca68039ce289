"""One domain of a domain batch norm as a plain batch norm: for folding and serving one domain.

A `bnjax.linen.DomainBatchNorm` keeps D rows of running statistics (and, with
``per_domain_affine``, D scale/bias rows). In evaluation, an example of domain d is normalized
by an affine map built from row d, so a layer that serves a single domain is exactly a
`bnjax.linen.BatchNorm` holding row d. `select_domain` writes those rows: the same model built
with 'batch' norms instead then evaluates as the domain model does on domain d, and
`fold_model` folds it into the convolutions like any batch norm. (`fold_model` itself leaves
a DomainBatchNorm unfolded: one kernel cannot hold D different affines.)

    variables_d = select_domain(domain_model, variables, 1, x, train=False)
    folded = fold_model(batch_model, variables_d, x, train=False)

AdvProp serves the main BN (domain 0); DSBN serves the target domain's branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bnjax.lifecycle.layers import (
    LINEN_DOMAIN_BATCH_NORMS,
    PARAMS,
    STATS,
    Path,
    get_path,
    path_str,
    set_path,
    to_dict,
)

__all__ = ["domain_layers", "select_domain"]


def domain_layers(model: nn.Module, variables, *inputs, **apply_kwargs) -> dict[Path, Any]:
    """{module path: module} of the domain batch norms a call of `model` goes through (traced
    with ``jax.eval_shape``: no compute)."""
    found: dict[Path, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, LINEN_DOMAIN_BATCH_NORMS):
            found[tuple(module.path)] = module
        return next_fun(*args, **kwargs)

    def run(variables, *inputs):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *inputs, **apply_kwargs)

    jax.eval_shape(run, variables, *inputs)
    return found


def select_domain(model: nn.Module, variables, domain: int, *inputs, **apply_kwargs) -> dict:
    """`variables` with every domain batch norm reduced to domain `domain`'s row: the
    variables of the same network built with BatchNorm layers (see the module docstring).

    Args:
      model: a linen model with `bnjax.linen.DomainBatchNorm` layers.
      variables: its variables ('params', 'batch_stats').
      domain: the domain to keep, in [0, num_domains) of every layer.
      inputs, apply_kwargs: a call of the model (shapes only) that reaches every layer, e.g.
        ``x, train=False``.

    Returns:
      New variables: 'batch_stats' mean/var (C,) (and scalar 'count'/'skipped' where kept) and
      per-domain 'scale'/'bias' (C,) of row `domain`; shared parameters and every other layer
      unchanged.

    Example:
      >>> from bnjax import models
      >>> x = jnp.ones((4, 3))
      >>> two = models.MLP(features=(5,), num_classes=2, norm="domain_batch")
      >>> variables = two.init(jax.random.key(0), x, train=False)
      >>> one = select_domain(two, variables, 1, x, train=False)
      >>> one["batch_stats"]["norm0"]["mean"].shape, one["params"]["norm0"]["scale"].shape
      ((5,), (5,))
    """
    layers = domain_layers(model, variables, *inputs, **apply_kwargs)
    if not layers:
        raise ValueError(
            "`model` has no DomainBatchNorm layer on this call: nothing to select (check the "
            "model's norm and the call's inputs)."
        )
    new = to_dict(variables)
    for path, module in layers.items():
        num_domains = int(module.num_domains)
        if isinstance(domain, bool) or not isinstance(domain, (int, np.integer)):
            raise TypeError(f"`domain` must be an int, got {domain!r}.")
        if not 0 <= domain < num_domains:
            raise ValueError(
                f"`domain`={domain} is outside [0, {num_domains}) for the domain batch norm "
                f"{path_str(path)!r}."
            )
        stats = dict(get_path(new[STATS], path))
        set_path(new[STATS], path, {name: value[domain] for name, value in stats.items()})
        if module.per_domain_affine and PARAMS in new:
            params: Mapping[str, Any] = get_path(new[PARAMS], path, {})
            if params:
                set_path(new[PARAMS], path, {n: v[domain] for n, v in params.items()})
    return new
