"""flax.nnx DomainBatchNorm: running statistics (and scale, bias) per domain."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from bnjax.core.checks import as_int
from bnjax.core.domain_batch_norm import DomainBatchNormState, domain_batch_norm
from bnjax.nnx._shared import (
    _RunningStats,
)


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class DomainBatchNorm(_RunningStats):
    """Domain-specific batch normalization (`bnjax.domain_batch_norm`): running statistics,
    and by default scale and bias, per domain, chosen per example by an integer index.

    Args:
      num_features: channels C (or the feature shape, for several feature axes).
      num_domains, per_domain_affine, default_domain: see their declarations below (and
        `bnjax.linen.DomainBatchNorm`).
      the other options: as `BatchNorm`; `track_counters` keeps (D,) int32 counters.

    Shapes: x (N, ..., C) with axis=-1, domain (N,); mean, var (D, C); scale, bias (D, C),
    or (C,) when shared.

    Example:
      >>> bn = DomainBatchNorm(3, num_domains=2, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(24.0).reshape(8, 3)
      >>> y = bn(x, domain=jnp.array([0, 0, 0, 0, 1, 1, 1, 1]))     # training
      >>> bn.mean[...].shape, bn.scale[...].shape
      ((2, 3), (2, 3))
      >>> bn.eval()  # now each example uses its domain's running statistics
    """

    num_domains: int = 2
    """D, the number of domains (row d of the statistics belongs to domain d)."""
    per_domain_affine: bool = True
    """One scale and bias per domain, (D, C) (DSBN, AdvProp's auxiliary BN, FedBN); False
    shares one (C,) pair (SiloBN)."""
    default_domain: int | None = 0
    """Domain of every example when the call passes no `domain` (None: `domain` required)."""

    def __post_init__(self, *init_only):
        super().__post_init__(*init_only)
        num_domains = as_int(self.num_domains, "num_domains")
        if num_domains < 1:
            raise ValueError(f"`num_domains` must be a positive int, got {num_domains!r}.")

        def stacked(value):
            return jnp.broadcast_to(value, (num_domains, *value.shape))

        # Every domain starts from the same statistics and the same initial affine (the
        # initializer's draw for one domain, so the rng use is flax's BatchNorm's).
        self.mean = nnx.BatchStat(stacked(self.mean[...]))
        self.var = nnx.BatchStat(stacked(self.var[...]))
        if self.track_counters:
            self.count = nnx.BatchStat(jnp.zeros((num_domains,), jnp.int32))
            self.skipped = nnx.BatchStat(jnp.zeros((num_domains,), jnp.int32))
        if self.per_domain_affine:
            for name in ("scale", "bias"):
                param = getattr(self, name)
                if param is not None:
                    setattr(self, name, param.replace(stacked(param[...])))

    def _counter_values(self):
        if not self.track_counters:
            return (jnp.zeros((self.mean.shape[0],), jnp.int32),) * 2
        return self.count[...], self.skipped[...]

    def __call__(self, x, use_running_average: bool | None = None, *, domain=None, mask=None):
        """Normalizes `x` by each example's domain (`domain`: int (N,) or one int; None:
        `default_domain`); `use_running_average` overrides the attribute for this call."""
        training = self._training(use_running_average)
        x, scale, bias, out_dtype = self._inputs(x)
        if domain is None:
            if self.default_domain is None:
                raise TypeError(
                    "DomainBatchNorm has default_domain=None, so the call needs `domain`: an "
                    f"int array of shape ({x.shape[0]},) of domain indices."
                )
            domain = jnp.full((x.shape[0],), self.default_domain, jnp.int32)
        state = DomainBatchNormState(self.mean[...], self.var[...], *self._counter_values())
        y, new = domain_batch_norm(
            x, state, scale, bias, domain=domain, mask=mask, **self._options(training)
        )
        if training:
            self.mean[...], self.var[...] = new.mean, new.var
            self._store_counters(new)
        return y.astype(out_dtype)
