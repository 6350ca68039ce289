"""CIFAR-style residual networks (He et al., 2016) with a choice of normalization.

ResNet-20 is the paper's CIFAR network: a 3x3 stem with 16 channels, then three stages of 3
basic blocks with 16, 32 and 64 channels (stride 2 between stages). ResNet-18 here is the usual
CIFAR adaptation of the ImageNet model: a 3x3 stride-1 stem without max-pooling, then four stages
of 2 basic blocks with 64-512 channels.

Flax conventions of the field: convolutions carry no bias when a norm follows, kernels use He
(fan-out) initialisation, projection shortcuts (1x1 conv + norm) when the shape changes, and
`zero_init_residual=True` starts the last norm scale of every block at 0 (each block then
begins as the identity, which helps large-batch training).
"""

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

_HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _NormSettings(nn.Module):
    """Fields every block shares (kept in one place so blocks and networks agree)."""

    norm: str | NormFactory | None = "batch"  # see bnjax.models.norms
    norm_groups: int = 8
    norm_options: Mapping[str, Any] | None = None
    dtype: Any = jnp.float32
    conv: str | ConvFactory = "plain"  # see bnjax.models.convs

    def conv_layer(self, features, kernel, strides=1, name=None):
        conv = conv_class(self.conv)(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding="SAME",
            use_bias=uses_bias_before_norm(self.norm),
            kernel_init=_HE_INIT,
            dtype=self.dtype,
            name=name,
        )
        # A norm that owns its conv (cross-iteration BN) takes the conv's input instead.
        factory = norm_factory(
            self.norm, spatial=True, groups=self.norm_groups, options=self.norm_options
        )
        return conv_or_fused(conv, factory)

    def normalize(
        self,
        x,
        mask,
        train: bool,
        name: str,
        zero_scale: bool = False,
        relu: bool = False,
        domain=None,
    ):
        """The block's norm `name` applied to x (`mask`, `domain`: see
        `bnjax.models.norms.apply_norm`), then a ReLU when `relu`. A norm that includes its
        activation (FRN, EvoNorm) replaces the norm-ReLU pair, and is built with
        ``activation=False`` where no ReLU follows."""
        factory = norm_factory(
            self.norm, spatial=True, groups=self.norm_groups, options=self.norm_options
        )
        layer = make_layer(
            factory,
            train=train,
            name=name,
            dtype=self.dtype,
            zero_scale=zero_scale,
            activation=relu,
        )
        y = apply_norm(layer, x, mask, domain)
        return activation_after(factory, nn.relu)(y) if relu else y


class BasicBlock(_NormSettings):
    """x -> conv3x3 -> norm -> relu -> conv3x3 -> norm, plus the (projected) input, -> relu.

    A norm that includes its activation (FRN + TLU, EvoNorm) replaces each norm-ReLU pair, as
    in its papers; norm2 and the shortcut norm, which no ReLU follows, are that norm with
    ``activation=False``; the ReLU after the addition follows no norm and stays.

    Example:
      >>> block = BasicBlock(features=8, strides=2)               # 4 -> 8 channels: projection
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
      >>> sorted(shapes["batch_stats"])                           # traced only, no compute
      ['norm1', 'norm2', 'shortcut_norm']
      >>> jax.eval_shape(lambda v: block.apply(v, x, train=False), shapes).shape
      (2, 4, 4, 8)
    """

    features: int = 16
    strides: int = 1
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None, domain=None):
        y = self.conv_layer(self.features, 3, self.strides, name="conv1")(x)
        y = self.normalize(y, mask, train, "norm1", relu=True, domain=domain)
        y = self.conv_layer(self.features, 3, name="conv2")(y)
        y = self.normalize(
            y, mask, train, "norm2", zero_scale=self.zero_init_residual, domain=domain
        )
        if x.shape != y.shape:
            x = self.conv_layer(self.features, 1, self.strides, name="shortcut_conv")(x)
            x = self.normalize(x, mask, train, "shortcut_norm", domain=domain)
        return nn.relu(x + y)


class ResNet(_NormSettings):
    """(N, H, W, C) images -> (N, num_classes) logits; features sown as 'intermediates'.

    Example:
      >>> model = resnet20(num_classes=10, norm="group")
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> # variables = model.init(jax.random.key(0), x, train=False); shapes only, here:
      >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
      >>> jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).shape
      (2, 10)
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    stage_features: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None, domain=None):
        """x (N, H, W, C) -> logits (N, classes); `mask` (N,) marks the examples that enter
        batch statistics (None: all); `domain` (N,) ints pick each example's statistics in
        'domain_batch' norms (None: their `default_domain`)."""
        norm_factory(self.norm, spatial=True, groups=self.norm_groups, options=self.norm_options)
        check_widths(self.stage_features, "stage_features")
        if len(self.stage_sizes) != len(self.stage_features):
            raise ValueError(
                f"`stage_sizes` {tuple(self.stage_sizes)} and `stage_features` "
                f"{tuple(self.stage_features)} must have the same length (one per stage)."
            )
        x = x.astype(self.dtype)
        x = self.conv_layer(self.stage_features[0], 3, name="stem_conv")(x)
        x = self.normalize(x, mask, train, "stem_norm", relu=True, domain=domain)
        for stage, (blocks, width) in enumerate(
            zip(self.stage_sizes, self.stage_features, strict=True)
        ):
            for block in range(blocks):
                x = BasicBlock(
                    features=width,
                    strides=2 if stage > 0 and block == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    norm=self.norm,
                    norm_groups=self.norm_groups,
                    norm_options=self.norm_options,
                    dtype=self.dtype,
                    conv=self.conv,
                    name=f"stage{stage}_block{block}",
                )(x, train=train, mask=mask, domain=domain)
        features = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", features)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)


def resnet20(**options) -> ResNet:
    """ResNet-20 for 32x32 images: 3 stages x 3 blocks, 16/32/64 channels, 0.27M parameters.

    Example:
      >>> model = resnet20(num_classes=10)
      >>> init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
      >>> sum(p.size for p in jax.tree.leaves(jax.eval_shape(init)["params"]))   # as He et al.
      272474
    """
    return ResNet(stage_sizes=(3, 3, 3), stage_features=(16, 32, 64), **options)


def resnet18(**options) -> ResNet:
    """CIFAR ResNet-18: 4 stages x 2 blocks, 64/128/256/512 channels, 11M parameters.

    Example:
      >>> model = resnet18(num_classes=10)
      >>> init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
      >>> sum(p.size for p in jax.tree.leaves(jax.eval_shape(init)["params"]))   # shapes only
      11173962
    """
    return ResNet(stage_sizes=(2, 2, 2, 2), stage_features=(64, 128, 256, 512), **options)
