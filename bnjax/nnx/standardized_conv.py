"""flax.nnx convolutions with a reparametrized kernel: weight-standardized and centered.

`StandardizedConv` and `CenteredConv` take exactly ``flax.nnx.Conv``'s arguments (plus
`epsilon` for the first) and hold its variables (``kernel`` (kh, ..., C_in / groups, C_out)
and ``bias`` (C_out,) as ``nnx.Param``), but convolve with the kernel mapped per output channel
over its fan-in (every axis but the last):

    StandardizedConv:  W_hat = (W - mean) / sqrt(var + epsilon)     (`bnjax.standardize_weight`)
    CenteredConv:      W_hat =  W - mean                            (`bnjax.centralize_weight`)

so a layer equals ``nnx.Conv`` holding ``standardize_weight(W)``. The stored kernel is never
changed; gradients flow through the map to it. The map runs on the kernel in its stored dtype
(float32 by default) before the cast to `dtype`, inside the layer's `promote_dtype`, which
wraps the one passed (``layer.promote_dtype.promote`` is that one).

With `mask`, the statistics run over the entries the mask keeps (mask != 0) of the masked
kernel ``mask * W``, and the result is masked again: the hidden entries stay 0.

References:
  Qiao, Wang, Liu, Shen & Yuille (2019), Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization, arXiv:1903.10520, Section 3.1.
  Kolesnikov et al. (2020), Big Transfer (BiT), arXiv:1912.11370 (StdConv).
  Yan et al. (2020), Towards Stabilizing Batch Statistics in Backward Propagation of Batch
  Normalization, ICLR, arXiv:2001.06838 (weight centralization).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from bnjax.core.weight_standardization import centralize_weight, standardize_weight

__all__ = ["CenteredConv", "KernelFirst", "StandardizedConv"]


class KernelFirst:
    """A `promote_dtype` for nnx layers that maps the (masked) kernel first, then promotes.

    Attributes:
      kernel_fn: the map, applied to ``mask * W`` (keyword ``mask=``: the kept entries).
      promote: the `promote_dtype` it runs afterwards (flax's by default).
      mask: the layer's mask (NumPy, or None).
    """

    def __init__(self, kernel_fn: Callable, promote: Callable, mask):
        self.kernel_fn, self.promote = kernel_fn, promote
        self.mask = None if mask is None else np.asarray(mask)

    def mapped(self, masked_kernel):
        """`kernel_fn` of the masked stored kernel (mask * W), statistics over the entries the
        mask keeps (0 at the others); the layer masks it again before convolving."""
        if self.mask is None:
            return self.kernel_fn(masked_kernel)
        return self.kernel_fn(masked_kernel, mask=jnp.asarray(self.mask != 0))

    def __call__(self, arrays, dtype=None):
        inputs, kernel, bias = arrays
        kernel = self.mapped(kernel)
        if self.mask is not None:
            kernel = kernel * jnp.asarray(self.mask, kernel.dtype)
        return self.promote((inputs, kernel, bias), dtype=dtype)


class _ReparametrizedConv(nnx.Conv):
    def __init__(self, *args, kernel_fn: Callable, promote_dtype=dtypes.promote_dtype, **kwargs):
        super().__init__(*args, promote_dtype=promote_dtype, **kwargs)
        self.promote_dtype = KernelFirst(kernel_fn, promote_dtype, self.mask)


class StandardizedConv(_ReparametrizedConv):
    """``flax.nnx.Conv`` with a weight-standardized kernel (see the module docstring).

    Args: those of ``flax.nnx.Conv``, with its defaults, plus `epsilon` (keyword): added to
    each output channel's kernel variance inside the square root (fixed at construction, like
    the mask).

    Example:
      >>> conv = StandardizedConv(3, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> plain = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(1))
      >>> plain.kernel[...] = bnjax.standardize_weight(conv.kernel[...])
      >>> bool(jnp.allclose(conv(x), plain(x)))
      True
    """

    def __init__(self, *args, epsilon: float = 1e-5, **kwargs):
        self.epsilon = epsilon
        super().__init__(
            *args, kernel_fn=functools.partial(standardize_weight, epsilon=epsilon), **kwargs
        )


class CenteredConv(_ReparametrizedConv):
    """``flax.nnx.Conv`` with a centered kernel (weight centralization; see the module
    docstring).

    Example:
      >>> conv = CenteredConv(2, 3, (3,), rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((1, 5, 2))).shape
      (1, 5, 3)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, kernel_fn=centralize_weight, **kwargs)
