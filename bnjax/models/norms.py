"""The `norm` every bundled model takes: a Flax norm module factory, or a registry name.

A model's `norm` is a module class or a ``functools.partial`` of one (as in flax's ImageNet
example), called once per normalized layer with the layer's `name` (and the model's `dtype`
unless the partial sets one). Batch-statistics norms (any module with a `use_running_average`
field: bnjax's BatchNorm and BatchRenorm, ``flax.linen.BatchNorm``) also receive
``use_running_average=not train``, and the models' optional per-example `mask` (N,):

    model = SmallCNN(features=(8,), norm=functools.partial(flax.linen.BatchNorm, momentum=0.9))

`NORMS` is the registry of names: each builds such a partial (or None, no norm):

    'batch'         bnjax.linen.BatchNorm      statistics over batch and space, per channel
    'batch_renorm'  bnjax.linen.BatchRenorm    same, corrected toward running statistics
    'group'         bnjax.linen.GroupNorm      per example, `groups` channel groups + space
    'layer'         bnjax.linen.LayerNorm      per example, over every non-batch axis
    'instance'      bnjax.linen.InstanceNorm   per example and channel, over space
    'none'          None: no norm              (layers before it then carry a bias)
    'moving_average' bnjax.linen.MovingAverageBatchNorm  batch statistics of both passes
                    averaged over steps (MABN); pair with conv='centered'
    'domain_batch'  bnjax.linen.DomainBatchNorm  'batch' per domain: the models' optional
                                               per-example `domain` (N,) picks the statistics
    'frn'           bnjax.linen.FilterResponseNorm   per example and channel, + its TLU
    'evonorm_b0'    bnjax.linen.EvoNormB0      batch variance + instance term, its activation
    'evonorm_s0'    bnjax.linen.EvoNormS0      per example, `groups` channel groups, swish-like
    'cross_iteration' bnjax.linen.CrossIterationConvBatchNorm  conv + batch norm whose
                    statistics pool the last `window` steps (Taylor-compensated); it owns the
                    conv before it, so the models hand it that conv's input (`conv_or_fused`)

'frn', 'evonorm_b0' and 'evonorm_s0' include their activation (`includes_activation`): the
models apply no ReLU after them, and a norm the models do not follow by an activation (before
a residual addition) gets ``activation=False``.

A model given a name builds the partial itself, with its `norm_groups` and `norm_options`. In
training mode batch-statistics norms update 'batch_stats', so apply with
``mutable=['batch_stats']`` as with flax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from bnjax import linen as bnn

NormFactory = Callable[..., nn.Module]  # a module class or a functools.partial of one


def _batch(spatial, groups, **options):
    return functools.partial(bnn.BatchNorm, **options)


def _batch_renorm(spatial, groups, **options):
    return functools.partial(bnn.BatchRenorm, **options)


def _group(spatial, groups, **options):
    return functools.partial(bnn.GroupNorm, num_groups=groups, **options)


def _layer(spatial, groups, **options):
    # Over every non-batch axis: (H, W, C) of an image, C of a vector.
    reduction_axes = (1, 2, 3) if spatial else -1
    return functools.partial(
        bnn.LayerNorm, reduction_axes=reduction_axes, feature_axes=-1, **options
    )


def _instance(spatial, groups, **options):
    if not spatial:
        raise ValueError("`norm`='instance' needs spatial axes; use 'layer' for an MLP.")
    return functools.partial(bnn.InstanceNorm, **options)


def _moving_average(spatial, groups, **options):
    return functools.partial(bnn.MovingAverageBatchNorm, **options)


def _none(spatial, groups, **options):
    return None


def _domain_batch(spatial, groups, **options):
    return functools.partial(bnn.DomainBatchNorm, **options)


def _frn(spatial, groups, **options):
    # learned_epsilon=None: learned exactly where a mean square covers one value (dense
    # layers, 1x1 maps), as the paper recommends.
    return functools.partial(bnn.FilterResponseNorm, **options)


def _evonorm_b0(spatial, groups, **options):
    return functools.partial(bnn.EvoNormB0, **options)


def _evonorm_s0(spatial, groups, **options):
    return functools.partial(bnn.EvoNormS0, num_groups=groups, **options)


def _cross_iteration(spatial, groups, **options):
    if not spatial:
        raise ValueError(
            "`norm`='cross_iteration' is built fused with the conv before it (its statistics "
            "need that conv's kernel and input); the mlp has no conv: use 'batch' there."
        )
    return functools.partial(bnn.CrossIterationConvBatchNorm, **options)


# The registry: name -> build(spatial, groups, **module options) -> a norm factory (None: no
# norm). Its keys are the valid `norm` names.
NORMS: dict[str, Callable[..., NormFactory | None]] = {
    "batch": _batch,
    "batch_renorm": _batch_renorm,
    "group": _group,
    "layer": _layer,
    "instance": _instance,
    "none": _none,
    "moving_average": _moving_average,
    "domain_batch": _domain_batch,
    "frn": _frn,
    "evonorm_b0": _evonorm_b0,
    "evonorm_s0": _evonorm_s0,
    "cross_iteration": _cross_iteration,
}
BATCH_STATISTICS_NORMS = (
    "batch",
    "batch_renorm",
    "moving_average",
    "domain_batch",
    "evonorm_b0",
    "cross_iteration",
)


def check_norm(norm: str) -> None:
    """Raises a ValueError naming `norm` unless it is one of `NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"`norm`={norm!r} is not one of {tuple(NORMS)}.")


def norm_factory(
    norm: str | NormFactory | None,
    *,
    spatial: bool,
    groups: int = 8,
    options: Mapping[str, Any] | None = None,
) -> NormFactory | None:
    """The module factory for a model's `norm`: a name goes through `NORMS` (with `groups` and
    the module `options`), a factory (or None) is returned as is.

    Example:
      >>> norm_factory("batch", spatial=True, options={"momentum": 0.9}).keywords
      {'momentum': 0.9}
      >>> norm_factory("none", spatial=True) is None
      True
    """
    if norm is None or not isinstance(norm, str):
        if options:
            raise ValueError(
                "`norm_options` apply to a norm given by name; put the options in the norm's "
                f"functools.partial instead (got norm={norm!r})."
            )
        return norm
    check_norm(norm)
    return NORMS[norm](spatial, groups, **dict(options or {}))


def _module_class(factory) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def is_batch_statistics(factory: NormFactory | None) -> bool:
    """Whether modules from `factory` normalize with batch statistics in training (they have
    flax's `use_running_average` field).

    Example:
      >>> is_batch_statistics(functools.partial(nn.BatchNorm, momentum=0.9))
      True
      >>> is_batch_statistics(bnn.GroupNorm), is_batch_statistics(None)
      (False, False)
    """
    cls = _module_class(factory)
    if not dataclasses.is_dataclass(cls):
        return False
    return any(field.name == "use_running_average" for field in dataclasses.fields(cls))


def includes_activation(factory: NormFactory | None) -> bool:
    """Whether modules from `factory` apply their own activation (FRN's TLU, EvoNorm's), so
    that a model applies none after them (a class attribute ``includes_activation``).

    Example:
      >>> includes_activation(functools.partial(bnn.EvoNormS0, num_groups=4))
      True
      >>> includes_activation(bnn.BatchNorm), includes_activation(None)
      (False, False)
    """
    return bool(getattr(_module_class(factory), "includes_activation", False))


def activation_after(factory: NormFactory | None, activation):
    """`activation` for the models to apply after a norm from `factory`: the identity when
    the norm includes its own."""
    return _identity if includes_activation(factory) else activation


def fuses_conv(factory: NormFactory | None) -> bool:
    """Whether modules from `factory` own the conv before them (they take its input)."""
    return bool(getattr(_module_class(factory), "fuses_conv", False))


class DeferredConv(NamedTuple):
    """A conv's input and the (never called) conv module whose options a fused norm takes."""

    inputs: Any
    conv: nn.Conv


def conv_or_fused(conv: nn.Conv, factory: NormFactory | None):
    """`conv` itself, or, when the norm after it owns its conv (`fuses_conv`), a function that
    hands the conv's input and options to that norm: `apply_norm` then builds the fused layer
    (named as the norm) and `conv` is never called (it creates no variables). A fused norm's
    conv is a plain one, so a conv with another kernel map (`conv='standardized'`) is refused."""
    if not fuses_conv(factory):
        return conv
    if type(conv) is not nn.Conv:
        raise ValueError(
            f"`norm`={_module_class(factory).__name__} owns the conv before it, which is a plain "
            f"convolution; it cannot use {type(conv).__name__} (`conv` must be 'plain')."
        )
    return lambda x: DeferredConv(x, conv)


def _conv_options(conv: nn.Conv) -> dict[str, Any]:
    names = ("features", "kernel_size", "strides", "padding", "input_dilation")
    names += ("kernel_dilation", "feature_group_count", "kernel_init")
    return {name: getattr(conv, name) for name in names}


def uses_bias_before_norm(norm: str | NormFactory | None) -> bool:
    """A layer followed by a norm needs no bias: the norm's shift (or mean removal) absorbs it."""
    return norm is None or norm == "none"


def make_layer(
    factory: NormFactory | None,
    *,
    train: bool,
    name: str,
    dtype: Any = None,
    zero_scale: bool = False,
    activation: bool = True,
):
    """The norm layer `name` from `factory` (None: the identity), in training or evaluation mode.

    Args:
      factory: from `norm_factory`.
      train: training mode; batch-statistics norms then use and update batch statistics.
      name: module name.
      dtype: computation/output dtype unless the factory sets one (None: from the input).
      zero_scale: initialise the scale to 0 (last norm of a residual branch: the block starts
        as the identity, Goyal et al. 2017).
      activation: False for a norm that no activation follows (before a residual addition):
        a norm that includes its activation (`includes_activation`) then gets
        ``activation=False``; other norms are unaffected.
    """
    if factory is None:
        return _identity
    keywords = getattr(factory, "keywords", {})
    options: dict[str, Any] = {"name": name}
    if "dtype" not in keywords:
        options["dtype"] = dtype
    if is_batch_statistics(factory):
        options["use_running_average"] = not train
    if zero_scale:
        options["scale_init"] = nn.initializers.zeros
    if not activation and includes_activation(factory):
        options["activation"] = False
    if fuses_conv(factory):  # built by `apply_norm`, once the conv's options are known
        return functools.partial(factory, **options)
    return factory(**options)


def _identity(x, **unused):
    return x


def apply_norm(layer, x, mask=None, domain=None):
    """`layer(x)` for a layer from `make_norm`, with the per-example `mask` (N,) of booleans
    passed to batch-statistics norms as an (N, 1, ..., 1) mask (per-example norms need none),
    and the per-example `domain` (N,) of ints passed to norms that take one ('domain_batch').

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
    if isinstance(x, DeferredConv):  # a norm that owns its conv (see `conv_or_fused`)
        layer, x = layer(**_conv_options(x.conv)), x.inputs
    by_domain = {} if domain is None or not hasattr(layer, "num_domains") else {"domain": domain}
    if mask is None or not hasattr(layer, "use_running_average"):
        return layer(x, **by_domain)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:1] or mask.dtype != jnp.bool_:
        raise ValueError(
            f"`mask` must be a boolean array of shape ({x.shape[0]},), one flag per example, "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    return layer(x, mask=mask.reshape(mask.shape + (1,) * (x.ndim - 1)), **by_domain)


def make_norm(
    norm: str | NormFactory | None,
    *,
    train: bool,
    spatial: bool,
    groups: int = 8,
    zero_scale: bool = False,
    dtype: Any = None,
    options: Mapping[str, Any] | None = None,
    name: str | None = None,
):
    """A norm layer for activations of shape (N, H, W, C) (`spatial=True`) or (N, C):
    `make_layer(norm_factory(norm, ...), ...)`.

    Args:
      norm: one of NORMS, or a module factory (`functools.partial` of a norm module).
      train: training mode; batch-statistics norms then use and update batch statistics.
      spatial: whether the input has spatial axes (instance norm needs them).
      groups: channel groups for 'group' (must divide the channels).
      zero_scale: initialise the scale to 0 (see `make_layer`).
      dtype: computation/output dtype of the layer (None: from the input).
      options: extra keyword options for a named norm's module (e.g. momentum, axis_name).
      name: module name.

    Example:
      >>> norm = make_norm("batch", train=False, spatial=True, options={"momentum": 0.9})
      >>> type(norm).__name__, norm.use_running_average, norm.momentum
      ('BatchNorm', True, 0.9)
      >>> x = jnp.ones((2, 4, 4, 8))
      >>> make_norm("none", train=True, spatial=True)(x) is x                   # identity
      True
    """
    factory = norm_factory(norm, spatial=spatial, groups=groups, options=options)
    return make_layer(factory, train=train, name=name, dtype=dtype, zero_scale=zero_scale)
