"""Models that take a `norm`: an MLP, a small CNN and CIFAR-style ResNets.

`conv` (the convolutional models) is a conv module class or a name of `CONVS` (see
`bnjax.models.convs`): 'plain', 'standardized' (weight standardization), 'centered'.

`norm` is a norm module factory (``functools.partial(bnjax.linen.BatchNorm, momentum=0.9)``,
``flax.linen.BatchNorm``, ...) or a name of the registry `NORMS` (see `bnjax.models.norms`).

`MODELS` is the registry of the models a config names: its keys are the valid names, and
`build_model` is the one place a name becomes a module.
"""

from bnjax.models.cnn import SmallCNN
from bnjax.models.convs import CONVS, conv_class
from bnjax.models.mlp import MLP
from bnjax.models.norms import (
    BATCH_STATISTICS_NORMS,
    NORMS,
    apply_norm,
    is_batch_statistics,
    make_norm,
    norm_factory,
)
from bnjax.models.resnet import BasicBlock, ResNet, resnet18, resnet20

# name -> (constructor, whether its layer widths are an option: `features`)
MODELS = {
    "mlp": (MLP, True),
    "small_cnn": (SmallCNN, True),
    "resnet20": (resnet20, False),
    "resnet18": (resnet18, False),
}
# The models without convolutions: they take no `conv`.
DENSE_MODELS = ("mlp",)


def build_model(
    name: str, *, features=None, zero_init_residual: bool = False, conv="plain", **options
):
    """The model called `name` in `MODELS`, with the options every model takes (`num_classes`,
    `norm`: a name or a module factory, `norm_groups`, `norm_options`, `dtype`) plus
    `features` (the MLP's and the small CNN's widths) or `zero_init_residual` (the ResNets'),
    and `conv` (a name of `CONVS` or a conv class; the models of `DENSE_MODELS` have no
    convolution and take only 'plain').

    Example:
      >>> type(build_model("small_cnn", features=(8,), norm="group")).__name__
      'SmallCNN'
      >>> try:
      ...     build_model("resnet50")
      ... except ValueError as error:
      ...     print(error)
      unknown model 'resnet50'; the models are 'mlp', 'small_cnn', 'resnet20', 'resnet18'.
    """
    if name not in MODELS:
        known = ", ".join(repr(key) for key in MODELS)
        raise ValueError(f"unknown model {name!r}; the models are {known}.")
    conv_class(conv)  # an unknown name fails here, listing the names
    if name in DENSE_MODELS:
        if conv != "plain":
            raise ValueError(
                f"model {name!r} has no convolution, so `conv`={conv!r} would change nothing; "
                f"leave it 'plain' or pick a convolutional model."
            )
    else:
        options["conv"] = conv
    constructor, takes_widths = MODELS[name]
    if takes_widths:
        if features is not None:
            options["features"] = tuple(features)
        return constructor(**options)
    if features is not None:
        raise ValueError(f"model {name!r} has fixed layer widths; leave `features` unset.")
    return constructor(zero_init_residual=zero_init_residual, **options)


def layer_widths(name: str, features=None) -> tuple[int, ...]:
    """The widths of the normalized layers of the model `name`: `features` for the models that
    take them, the fixed stage widths of the others.

    Example:
      >>> layer_widths("resnet20"), layer_widths("mlp", (32, 64))
      ((16, 32, 64), (32, 64))
    """
    constructor, takes_widths = MODELS[name]
    return tuple(features) if takes_widths else tuple(constructor().stage_features)


__all__ = [
    "BATCH_STATISTICS_NORMS",
    "CONVS",
    "DENSE_MODELS",
    "MLP",
    "MODELS",
    "NORMS",
    "BasicBlock",
    "ResNet",
    "SmallCNN",
    "apply_norm",
    "build_model",
    "conv_class",
    "is_batch_statistics",
    "layer_widths",
    "make_norm",
    "norm_factory",
    "resnet18",
    "resnet20",
]
