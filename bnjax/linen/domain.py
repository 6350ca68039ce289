"""flax.linen DomainBatchNorm: running statistics (and scale, bias) per domain."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from bnjax.core.checks import as_int
from bnjax.core.domain_batch_norm import (
    DomainBatchNormState,
    domain_batch_norm,
    domain_moments,
)
from bnjax.linen._shared import (
    _COUNTER_NAMES,
    _feature_shape,
    _RunningStats,
)
from bnjax.module_common import promote


class DomainBatchNorm(_RunningStats):
    """Domain-specific batch normalization (`bnjax.domain_batch_norm`): running statistics,
    and by default scale and bias, per domain, chosen per example by an integer index.

    ``y_n = scale_d * (x_n - mean_d) / sqrt(var_d + epsilon) + bias_d`` with d the domain of
    example n: in training each domain's statistics come from its own examples of the batch,
    in evaluation from its running statistics. A split / auxiliary BN (AdvProp: domain 0
    clean, 1 adversarial), DSBN (a domain per source and target) or FedBN / SiloBN (a domain
    per client) in one layer.

    Attributes:
      num_domains: D, the number of domains.
      per_domain_affine: one 'scale' and 'bias' per domain, (D, C), as DSBN, AdvProp's
        auxiliary BN and FedBN; False shares one (C,) pair (SiloBN).
      default_domain: the domain of every example when the call passes no `domain` (0:
        AdvProp's main BN, which is also the one used at test time); None makes `domain`
        required.
      use_running_average, axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale,
        bias_init, scale_init, axis_name, axis_index_groups, ghost_batch_size,
        use_unbiased_running_var, use_fast_variance, force_float32_reductions: as `BatchNorm`.
      track_counters: keep int32 (D,) 'count' and 'skipped' in 'batch_stats', one per
        domain; needed by `momentum=None`.

    Shapes: x (N, ..., C) with axis=-1, domain (N,); 'batch_stats' mean and var (D, C);
    'params' scale and bias (D, C), or (C,) when shared.

    Example:
      >>> bn = DomainBatchNorm(num_domains=2, use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> domain = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])      # clean, then adversarial
      >>> variables = bn.init(jax.random.key(1), x, domain=domain)
      >>> jax.tree.map(jnp.shape, variables["batch_stats"])
      {'mean': (2, 3), 'var': (2, 3)}
      >>> y, updates = bn.apply(variables, x, domain=domain, mutable=["batch_stats"])
      >>> y.shape, updates["batch_stats"]["mean"].shape
      ((8, 3), (2, 3))
    """

    num_domains: int = 2
    per_domain_affine: bool = True
    default_domain: int | None = 0

    def _domain(self, x, domain):
        if domain is None:
            if self.default_domain is None:
                raise TypeError(
                    f"{type(self).__name__} has default_domain=None, so the call needs "
                    f"`domain`: an int array of shape ({x.shape[0]},) of domain indices."
                )
            return jnp.full((x.shape[0],), self.default_domain, jnp.int32)
        return domain

    def input_moments(self, x, use_running_average=None, *, domain=None, mask=None):
        """Per-domain moments (D, *features) of a call's input, as `__call__` would route it
        (what `bnjax.lifecycle.recalibrate` accumulates)."""
        del use_running_average  # the same routing in both modes
        x = jnp.asarray(x)
        return domain_moments(
            x,
            self._domain(x, domain),
            as_int(self.num_domains, "num_domains"),
            axis=self.axis,
            mask=mask,
        )

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, domain=None, mask=None):
        """Normalizes `x` by each example's domain (`domain`: int (N,) or one int; None:
        `default_domain`). `mask` as in `BatchNorm`."""
        training = self._training(use_running_average)
        x = jnp.asarray(x)
        num_domains = as_int(self.num_domains, "num_domains")
        stacked = (num_domains, *_feature_shape(x, self.axis, "axis"))
        mean = self.variable("batch_stats", "mean", jnp.zeros, stacked, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, stacked, jnp.float32)
        if self.momentum is None and training and not self.track_counters:
            raise ValueError(
                "momentum=None (a cumulative average) weighs each batch by the number of "
                "batches seen: set track_counters=True to keep that count in 'batch_stats'."
            )
        counters = None
        values = (jnp.zeros((num_domains,), jnp.int32),) * 2
        if self.track_counters:
            counters = [
                self.variable("batch_stats", n, jnp.zeros, (num_domains,), jnp.int32)
                for n in _COUNTER_NAMES
            ]
            values = tuple(c.value for c in counters)
        scale, bias = self._scale_and_bias(stacked if self.per_domain_affine else stacked[1:])
        x, out_dtype = promote(x, scale, bias, self.dtype)
        training, options = self._core_options(x, training)
        state = DomainBatchNormState(mean.value, var.value, *values)
        y, new_state = domain_batch_norm(
            x, state, scale, bias, domain=self._domain(x, domain), mask=mask, **options
        )
        if training and not self.is_initializing():
            mean.value, var.value = new_state.mean, new_state.var
            self._store_counters(counters, new_state)
        return y.astype(out_dtype)
