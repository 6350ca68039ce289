"""The `conv` the convolutional models take: a linen conv module class, or a registry name.

`CONVS` is the registry of names; each is a drop-in for ``flax.linen.Conv`` (same options,
same 'kernel' and 'bias' params), so a checkpoint's variables fit any of them:

    'plain'         flax.linen.Conv                 the stored kernel as it is
    'standardized'  bnjax.linen.StandardizedConv    kernel standardized per output channel
                                                    (weight standardization; with 'group':
                                                    BiT's GN + WS)
    'centered'      bnjax.linen.CenteredConv        kernel minus its mean per output channel
                                                    (weight centralization)

Example:
  >>> conv_class("standardized").__name__, conv_class(nn.Conv) is nn.Conv
  ('StandardizedConv', True)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from bnjax import linen as bnn

ConvFactory = Callable[..., nn.Module]  # a module class (or partial) taking nn.Conv's options

CONVS: dict[str, ConvFactory] = {
    "plain": nn.Conv,
    "standardized": bnn.StandardizedConv,
    "centered": bnn.CenteredConv,
}


def conv_class(conv: str | ConvFactory) -> ConvFactory:
    """The conv module factory `conv` names (a name of `CONVS`), or `conv` itself.

    Raises ValueError for an unknown name, listing the names.

    Example:
      >>> conv_class("centered").__name__
      'CenteredConv'
      >>> try:
      ...     conv_class("weight_std")
      ... except ValueError as error:
      ...     print(error)
      unknown `conv` 'weight_std'; the convs are 'plain', 'standardized', 'centered'.
    """
    if isinstance(conv, str):
        if conv not in CONVS:
            known = ", ".join(repr(name) for name in CONVS)
            raise ValueError(f"unknown `conv` {conv!r}; the convs are {known}.")
        return CONVS[conv]
    if not callable(conv):
        raise TypeError(f"`conv` must be a name of CONVS or a conv module class, got {conv!r}.")
    return conv
