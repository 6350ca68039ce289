"""flax.linen convolutions with a reparametrized kernel: weight-standardized and centered.

`StandardizedConv` and `CenteredConv` are ``flax.linen.Conv`` in every option (features,
kernel_size, strides, padding, dilations, feature_group_count, use_bias, mask, dtype,
param_dtype, precision, initializers, promote_dtype) and variable (``'params'``: ``'kernel'``
(kh, ..., C_in / groups, C_out) and ``'bias'`` (C_out,)), but convolve with the kernel mapped
per output channel over its fan-in (every axis but the last) by the core:

    StandardizedConv:  W_hat = (W - mean) / sqrt(var + epsilon)     (`bnjax.standardize_weight`)
    CenteredConv:      W_hat =  W - mean                            (`bnjax.centralize_weight`)

so ``StandardizedConv(...).apply({'params': {'kernel': W, ...}}, x)`` equals
``nn.Conv(...).apply({'params': {'kernel': standardize_weight(W), ...}}, x)``. The stored
kernel is never changed; gradients flow through the map to it. The map runs on the stored
kernel in its own dtype (float32 by default) before flax casts to `dtype`, so a bfloat16
network standardizes in float32.

With flax's `mask`, the statistics run over the entries the mask keeps (mask != 0) of the
masked kernel ``mask * W``, and flax masks the result again: the hidden entries stay 0 and do
not shift the statistics.

`stored_kernels` switches the map off (the layers convolve with the stored kernel as is);
`bnjax.lifecycle.fold_model` uses it to run a folded model whose kernels are already
standardized and scaled by the folded norm. `kernel_map` gives the map of a layer.

References:
  Qiao, Wang, Liu, Shen & Yuille (2019), Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization, arXiv:1903.10520, Section 3.1.
  Kolesnikov et al. (2020), Big Transfer (BiT), arXiv:1912.11370 (StdConv).
  Yan et al. (2020), Towards Stabilizing Batch Statistics in Backward Propagation of Batch
  Normalization, ICLR, arXiv:2001.06838 (weight centralization).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from bnjax.core.weight_standardization import centralize_weight, standardize_weight

__all__ = ["CenteredConv", "StandardizedConv", "kernel_map", "stored_kernels"]

_AS_STORED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bnjax_stored_kernels", default=False
)


@contextlib.contextmanager
def stored_kernels():
    """While active (at trace time), `StandardizedConv` and `CenteredConv` convolve with their
    stored kernel as it is, like ``nn.Conv``: for kernels already mapped (a folded model).

    Example:
      >>> conv, x = StandardizedConv(2, (1,)), jnp.ones((1, 3, 2))
      >>> variables = conv.init(jax.random.key(0), x)
      >>> plain = nn.Conv(2, (1,)).apply(variables, x)
      >>> with stored_kernels():
      ...     bool(jnp.allclose(conv.apply(variables, x), plain))
      True
    """
    token = _AS_STORED.set(True)
    try:
        yield
    finally:
        _AS_STORED.reset(token)


def _masked(kernel_fn: Callable, mask, kernel):
    """`kernel_fn` of ``mask * kernel`` with statistics over the kept entries (mask != 0)."""
    if mask is None:
        return kernel_fn(kernel)
    mask = jnp.asarray(mask)
    return kernel_fn(kernel * mask.astype(kernel.dtype), mask=mask != 0)


class _ReparametrizedConv(nn.Conv):
    """nn.Conv whose 'kernel' param is read through `_kernel_fn` (flax then masks, promotes
    and convolves it as usual)."""

    def _kernel_fn(self) -> Callable:
        raise NotImplementedError

    def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
        value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        if name != "kernel" or _AS_STORED.get():
            return value
        return _masked(self._kernel_fn(), self.mask, value)


class StandardizedConv(_ReparametrizedConv):
    """``flax.linen.Conv`` with a weight-standardized kernel (see the module docstring).

    Attributes:
      every attribute of ``flax.linen.Conv``, with its default; plus
      epsilon: added to each output channel's kernel variance inside the square root.

    Example:
      >>> conv = StandardizedConv(features=4, kernel_size=(3, 3), use_bias=False)
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> variables = conv.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, variables)                     # nn.Conv's tree
      {'params': {'kernel': (3, 3, 3, 4)}}
      >>> w_hat = bnjax.standardize_weight(variables["params"]["kernel"])
      >>> same = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": w_hat}}, x)
      >>> bool(jnp.allclose(conv.apply(variables, x), same))
      True
    """

    epsilon: float = 1e-5

    def _kernel_fn(self) -> Callable:
        return functools.partial(standardize_weight, epsilon=self.epsilon)


class CenteredConv(_ReparametrizedConv):
    """``flax.linen.Conv`` with a centered kernel: each output channel's kernel minus its mean
    over the fan-in (weight centralization; see the module docstring).

    Example:
      >>> conv = CenteredConv(features=2, kernel_size=(3,))
      >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 5, 2)))
      >>> w_hat = bnjax.centralize_weight(variables["params"]["kernel"])
      >>> float(jnp.abs(w_hat.sum(axis=(0, 1))).max()) < 1e-6
      True
    """

    def _kernel_fn(self) -> Callable:
        return centralize_weight


def kernel_map(module) -> Callable | None:
    """For a (bound) `StandardizedConv` / `CenteredConv`: the function from its stored kernel
    to the kernel it convolves with before flax's mask (None for any other module).

    Example:
      >>> kernel_map(StandardizedConv(2, (1,), epsilon=1e-3))(jnp.ones((1, 3, 2))).shape
      (1, 3, 2)
      >>> kernel_map(nn.Conv(2, (1,))) is None
      True
    """
    if not isinstance(module, _ReparametrizedConv):
        return None
    return functools.partial(_masked, module._kernel_fn(), module.mask)
