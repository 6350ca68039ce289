"""The in-memory dataset type and `load`, which looks the dataset's name up in `DATASETS`.

| name | source | image | classes | train / test | sub-clusters |
|---|---|---|---|---|---|
| `clusters` | generated from `seed` | 16x16x3 | 10 | 10000 / 2000 | 3 per class |
| `digits` | bundled with scikit-learn | 8x8x1 | 10 | 1438 / 359 | k-means |
| `mnist` | TFDS, prepared beforehand | 28x28x1 | 10 | 60000 / 10000 | k-means |
| `fashion_mnist` | TFDS, prepared beforehand | 28x28x1 | 10 | 60000 / 10000 | k-means |
| `cifar10` | TFDS, prepared beforehand | 32x32x3 | 10 | 50000 / 10000 | k-means |

('clusters' sizes are `ClusterConfig()`'s defaults; "k-means" means `kmeans_subclusters`.)

Preprocessing, the same for every dataset: float32 images, standardized per channel,
`images = (raw - mean) / std`, with `raw` in [0, 1] for the real datasets (pixel / 255, or
/ 16 for digits) and the generator's raw values for `clusters`; `mean` and `std` (C,) are the
training split's (published constants for the TFDS datasets) and are kept on the `Dataset`.
Labels are int32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from bnjax.data.tfds_source import TFDS_DATASETS


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, in memory.

    Attributes:
      images: (N, H, W, C) float32, standardized (see the module docstring).
      labels: (N,) int32 in [0, num_classes).
      num_classes: number of classes.
      name: e.g. 'clusters', 'digits', 'mnist'.
      split: e.g. 'train', 'test', or a TFDS split string such as 'train[:10%]'.
      subclusters: (N,) int32 sub-cluster ids, unique across classes (sub-cluster s of class k
        is k * per_class + s), or None where the dataset has none.
      mean, std: (C,) float32, the standardization that was applied.

    Example:
      >>> from bnjax.data import ClusterConfig
      >>> data = load("clusters", "test", config=ClusterConfig(num_classes=4, test_per_class=8))
      >>> len(data), data.image_shape, data.groups("subcluster").max()
      (32, (16, 16, 3), np.int32(11))
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str
    subclusters: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"Dataset needs images (N, H, W, C) and labels (N,), got {self.images.shape} "
                f"and {self.labels.shape}."
            )
        if self.subclusters is not None and self.subclusters.shape != self.labels.shape:
            raise ValueError(f"subclusters must have shape {self.labels.shape}.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])

    def groups(self, by: str = "class") -> np.ndarray:
        """(N,) the grouping a sampler uses: a key of `GROUPINGS`, 'class' (labels) or
        'subcluster'."""
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {tuple(GROUPINGS)}, got {by!r}.")
        return GROUPINGS[by](self)

    def subset(self, indices) -> Dataset:
        """The examples `indices` (in that order) as a Dataset of their own (same classes,
        standardization and split name), e.g. a validation split held out of training.

        Example:
          >>> from bnjax.data import ClusterConfig
          >>> data = load("clusters", "test", config=ClusterConfig(num_classes=2, test_per_class=4))
          >>> part = data.subset([0, 3])
          >>> len(part), part.num_classes, bool((part.labels == data.labels[[0, 3]]).all())
          (2, 2, True)
        """
        indices = np.asarray(indices)
        subclusters = None if self.subclusters is None else self.subclusters[indices]
        return dataclasses.replace(
            self, images=self.images[indices], labels=self.labels[indices], subclusters=subclusters
        )

    def take(self, indices) -> dict[str, np.ndarray]:
        """A batch: {'image': (b, H, W, C), 'label': (b,), 'index': (b,)} and 'subcluster' (b,)
        where the dataset has sub-clusters."""
        indices = np.asarray(indices)
        batch = {"image": self.images[indices], "label": self.labels[indices], "index": indices}
        if self.subclusters is not None:
            batch["subcluster"] = self.subclusters[indices]
        return batch


def load(
    name: str,
    split: str = "train",
    *,
    seed: int = 0,
    config=None,
    data_dir: str | None = None,
) -> Dataset:
    """Loads one split of a dataset into memory (see the table in the module docstring).

    Args:
      name: 'clusters', 'digits', 'mnist', 'fashion_mnist' or 'cifar10'.
      split: 'train' or 'test' ('clusters', 'digits'); any TFDS split string for TFDS names.
      seed: the synthetic mixture's seed ('clusters' only; other datasets are fixed).
      config: a `ClusterConfig` for 'clusters' (default: `ClusterConfig()`).
      data_dir: TFDS data directory (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
        The TFDS datasets are never downloaded here: prepare them beforehand (the error
        message says how).

    Example:
      >>> from bnjax.data import ClusterConfig
      >>> config = ClusterConfig(num_classes=2, image_size=4, train_per_class=10, test_per_class=4)
      >>> test = load("clusters", "test", config=config, seed=1)
      >>> test.images.shape, test.images.dtype, np.bincount(test.labels).tolist()
      ((8, 4, 4, 3), dtype('float32'), [4, 4])
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    if config is not None and name != "clusters":
        raise ValueError(f"config applies to 'clusters' only, not {name!r}.")
    return DATASETS[name](split, seed=seed, config=config, data_dir=data_dir)


def _by_class(dataset: Dataset) -> np.ndarray:
    return dataset.labels


def _by_subcluster(dataset: Dataset) -> np.ndarray:
    if dataset.subclusters is None:
        raise ValueError(
            f"Dataset '{dataset.name}' has no sub-clusters; compute them with "
            "bnjax.data.kmeans_subclusters(train, test) or group by='class'."
        )
    return dataset.subclusters


# The registry of groupings: name -> (N,) group ids of a dataset. Its keys are the valid
# `Dataset.groups(by)` values (configs' `sampler_groups`, study conditions' `groups`).
GROUPINGS: dict[str, Callable[[Dataset], np.ndarray]] = {
    "class": _by_class,
    "subcluster": _by_subcluster,
}


def _load_clusters(split: str, *, seed: int, config, data_dir) -> Dataset:
    from bnjax.data import synthetic

    config = config if config is not None else synthetic.ClusterConfig()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for 'clusters', got {split!r}.")
    generated = synthetic.generate(config, seed)
    images, labels, subclusters = generated[split]
    return Dataset(
        images,
        labels,
        config.num_classes,
        "clusters",
        split,
        subclusters,
        generated["mean"],
        generated["std"],
    )


def _load_digits(split: str, *, seed: int, config, data_dir) -> Dataset:
    from bnjax.data import digits

    return digits.load_digits(split)


def _load_tfds(name: str, split: str, *, seed: int, config, data_dir) -> Dataset:
    from bnjax.data import tfds_source

    return tfds_source.load_tfds(name, split, data_dir=data_dir)


# The registry of datasets: name -> load(split, *, seed, config, data_dir). Its keys are the
# valid `load` names (configs' `dataset`); the TFDS ones are those of
# `bnjax.data.tfds_source.TFDS_DATASETS`.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "clusters": _load_clusters,
    "digits": _load_digits,
    **{name: functools.partial(_load_tfds, name) for name in TFDS_DATASETS},
}


def kmeans_subclusters(
    train: Dataset, *others: Dataset, per_class: int = 3, seed: int = 0
) -> tuple[Dataset, ...]:
    """Sub-clusters for a dataset that has none: k-means (scikit-learn) within each class.

    Fits `per_class` centroids per class on `train`'s flattened images, then labels every
    example of `train` and of `others` (e.g. the test split) with its class's nearest
    centroid. Ids are global: k * per_class + s. Returns the datasets with `subclusters` set.

    Example:
      >>> from bnjax.data import ClusterConfig
      >>> config = ClusterConfig(num_classes=2, image_size=4, train_per_class=10, test_per_class=4)
      >>> train, test = (dataclasses.replace(load("clusters", split, config=config),
      ...                                    subclusters=None) for split in ("train", "test"))
      >>> train, test = kmeans_subclusters(train, test, per_class=2)
      >>> sorted(set(train.subclusters.tolist())), test.subclusters.shape   # class k: 2k, 2k+1
      ([0, 1, 2, 3], (8,))
    """
    from sklearn.cluster import KMeans

    centroids = []
    for label in range(train.num_classes):
        members = train.images[train.labels == label].reshape(-1, np.prod(train.image_shape))
        if len(members) < per_class:
            raise ValueError(f"Class {label} has {len(members)} examples < per_class={per_class}.")
        kmeans = KMeans(per_class, n_init=3, random_state=seed).fit(members)
        centroids.append(kmeans.cluster_centers_.astype(np.float32))
    centroids = np.stack(centroids)  # (K, S, D)

    def assign(data: Dataset) -> Dataset:
        flat = data.images.reshape(len(data), -1)
        nearest = np.empty(len(data), np.int32)
        for label in range(train.num_classes):
            rows = np.flatnonzero(data.labels == label)
            centres = centroids[label]  # |x - c|^2 up to |x|^2, without an (n, S, D) array
            distances = (centres**2).sum(-1) - 2 * flat[rows] @ centres.T
            nearest[rows] = label * per_class + np.argmin(distances, axis=1)
        return dataclasses.replace(data, subclusters=nearest)

    return tuple(assign(data) for data in (train, *others))
