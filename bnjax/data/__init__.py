"""Datasets and batch-composition samplers for the batch-norm study.

Datasets (`load(name, split)` -> an in-memory `Dataset`, standardized float32 NHWC; the
registry `DATASETS` maps each name to its loader):
'clusters' (generated heterogeneous class clusters, no download), 'digits' (scikit-learn's
bundled 8x8 digits), and 'mnist', 'fashion_mnist', 'cifar10' through `tfds.data_source`
(prepared beforehand; never downloaded here).

Samplers (the study's lever): `UniformSampler`, `ClusteredSampler`, `SkewedSampler`,
`BalancedSampler`, or `make_sampler(kind, groups, batch_size, ...)` with a name of the
registry `SAMPLERS`, grouping examples by a name of `GROUPINGS` (`dataset.groups(by)`).
`sampler.epoch(e)` is the epoch's (num_batches, batch_size) index order, deterministic from
(seed, e); `shard` gives a process its rows; `batches(...)` iterates a process's batches;
`composition` measures them.

Example:
  >>> from bnjax import data
  >>> train = data.load("clusters", "train")
  >>> sampler = data.make_sampler("skewed", train.groups("class"), batch_size=128, skew=0.8)
  >>> batch = next(data.batches(train, sampler))
  >>> batch["image"].shape, batch["label"].dtype
  ((128, 16, 16, 3), dtype('int32'))
  >>> round(data.composition.estimate_skew(sampler.epoch(0), train.labels), 1)
  0.8

The grain path (`bnjax.data.grain_pipeline`) and TFDS (`bnjax.data.tfds_source`) import their
optional dependencies only when used.
"""

from bnjax.data import composition
from bnjax.data.dataset import DATASETS, GROUPINGS, Dataset, kmeans_subclusters, load
from bnjax.data.pipeline import SAMPLERS, batches, make_sampler
from bnjax.data.samplers import (
    BalancedSampler,
    BatchSampler,
    ClusteredSampler,
    SkewedSampler,
    UniformSampler,
)
from bnjax.data.sharding import shard
from bnjax.data.synthetic import ClusterConfig

__all__ = [
    "DATASETS",
    "GROUPINGS",
    "SAMPLERS",
    "BalancedSampler",
    "BatchSampler",
    "ClusterConfig",
    "ClusteredSampler",
    "Dataset",
    "SkewedSampler",
    "UniformSampler",
    "batches",
    "composition",
    "kmeans_subclusters",
    "load",
    "make_sampler",
    "shard",
]
