"""Models that take a `norm` choice: an MLP, a small CNN and CIFAR-style ResNets."""

from bnjax.models.cnn import SmallCNN
from bnjax.models.mlp import MLP
from bnjax.models.norms import BATCH_STATISTICS_NORMS, NORMS, apply_norm, make_norm
from bnjax.models.resnet import BasicBlock, ResNet, resnet18, resnet20

__all__ = [
    "BATCH_STATISTICS_NORMS",
    "MLP",
    "NORMS",
    "BasicBlock",
    "ResNet",
    "SmallCNN",
    "apply_norm",
    "make_norm",
    "resnet18",
    "resnet20",
]
