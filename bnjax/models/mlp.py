"""A multilayer perceptron with a norm after every hidden dense layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bnjax.models.norms import (
    NormFactory,
    activation_after,
    apply_norm,
    make_layer,
    norm_factory,
    uses_bias_before_norm,
)


def check_widths(widths, name: str) -> None:
    """Raises a ValueError unless `widths` is a non-empty sequence of positive ints (one layer
    width each); `name` is the model field (config.model_features in the training configs).

    Example:
      >>> check_widths((32, 64), "features")                   # fine: returns None
      >>> try:
      ...     check_widths((0,), "features")
      ... except ValueError as error:
      ...     print(str(error).split(", one width")[0])
      `features`=(0,) must be a non-empty sequence of positive ints
    """
    valid = isinstance(widths, Sequence) and not isinstance(widths, str) and len(widths) > 0
    if valid:
        valid = all(
            isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0 for w in widths
        )
    if not valid:
        raise ValueError(
            f"`{name}`={widths!r} must be a non-empty sequence of positive ints, one width per "
            f"layer (config.model_features in the training configs), e.g. (32, 64)."
        )


class MLP(nn.Module):
    """(N, ...) -> flatten -> [dense -> norm -> relu] x len(features) -> dense -> (N, classes).

    Example:
      >>> model = MLP(features=(32,), num_classes=10)
      >>> x = jnp.ones((4, 8, 8, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
      >>> logits.shape
      (4, 10)
    """

    features: Sequence[int] = (256, 256)
    num_classes: int = 10
    norm: str | NormFactory | None = "batch"  # see bnjax.models.norms
    norm_groups: int = 8
    norm_options: Mapping[str, Any] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None, domain=None):
        """x (N, ...) -> logits (N, classes); `mask` (N,) marks the examples that enter
        batch statistics (None: all); `domain` (N,) ints pick each example's statistics in
        'domain_batch' norms (None: their `default_domain`)."""
        check_widths(self.features, "features")
        factory = norm_factory(
            self.norm, spatial=False, groups=self.norm_groups, options=self.norm_options
        )
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Dense(
                width,
                use_bias=uses_bias_before_norm(self.norm),
                dtype=self.dtype,
                name=f"dense{i}",
            )(x)
            norm = make_layer(factory, train=train, name=f"norm{i}", dtype=self.dtype)
            x = apply_norm(norm, x, mask, domain)
            x = activation_after(factory, nn.relu)(x)  # none after FRN/EvoNorm
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)
