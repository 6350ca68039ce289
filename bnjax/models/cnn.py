"""A small convolutional network: the quick model for studies and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bnjax.models.convs import ConvFactory, conv_class
from bnjax.models.mlp import check_widths
from bnjax.models.norms import (
    NormFactory,
    activation_after,
    apply_norm,
    conv_or_fused,
    make_layer,
    norm_factory,
    uses_bias_before_norm,
)


class SmallCNN(nn.Module):
    """(N, H, W, C) -> [conv3x3 -> norm -> relu -> avg-pool 2x2] per stage -> mean over space
    -> dense -> (N, classes). The penultimate features are sown as 'intermediates/features'.

    Example:
      >>> model = SmallCNN(features=(8, 16), num_classes=10)
      >>> x = jnp.ones((4, 8, 8, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> model.apply(variables, x, train=False).shape
      (4, 10)

    `norm` is a name of `bnjax.models.NORMS` or any norm module factory, flax's own included:
      >>> import functools
      >>> flax_bn = SmallCNN(features=(8,), norm=functools.partial(nn.BatchNorm, momentum=0.9))
      >>> variables = flax_bn.init(jax.random.key(0), x, train=False)
      >>> logits, updates = flax_bn.apply(variables, x, train=True, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"]["norm0"])
      ['mean', 'var']
    """

    features: Sequence[int] = (32, 64)
    num_classes: int = 10
    norm: str | NormFactory | None = "batch"  # see bnjax.models.norms
    norm_groups: int = 8
    norm_options: Mapping[str, Any] | None = None
    dtype: Any = jnp.float32
    conv: str | ConvFactory = "plain"  # see bnjax.models.convs

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None, domain=None):
        """x (N, H, W, C) -> logits (N, classes); `mask` (N,) marks the examples that enter
        batch statistics (None: all); `domain` (N,) ints pick each example's statistics in
        'domain_batch' norms (None: their `default_domain`)."""
        check_widths(self.features, "features")
        factory = norm_factory(
            self.norm, spatial=True, groups=self.norm_groups, options=self.norm_options
        )
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            conv = conv_class(self.conv)(
                width,
                (3, 3),
                use_bias=uses_bias_before_norm(self.norm),
                dtype=self.dtype,
                name=f"conv{i}",
            )
            x = conv_or_fused(conv, factory)(x)  # a norm that owns its conv takes x itself
            norm = make_layer(factory, train=train, name=f"norm{i}", dtype=self.dtype)
            x = apply_norm(norm, x, mask, domain)
            x = activation_after(factory, nn.relu)(x)  # none after FRN/EvoNorm
            if x.shape[1] > 1 and x.shape[2] > 1:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", features)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)
