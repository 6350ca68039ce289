"""scikit-learn's bundled handwritten digits: 1797 8x8 grayscale images, no download.

The data ship inside scikit-learn (`sklearn.datasets.load_digits`). There is no official
split, so this one is fixed (independent of any seed): per class, a random 20% (rounded) goes
to 'test', drawn with `numpy.random.default_rng(0)`, giving 1438 train / 359 test examples.
Pixels (0..16) are scaled to [0, 1], then standardized with the training split's mean and std.
"""

from __future__ import annotations

import functools

import numpy as np

TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _splits() -> dict:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(0)
    is_test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        is_test[members[: round(TEST_FRACTION * len(members))]] = True
    train = images[~is_test]
    mean = train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = train.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    out = {"mean": mean, "std": std}
    for split, rows in (("train", ~is_test), ("test", is_test)):
        standardized = (images[rows] - mean) / std
        standardized.flags.writeable = False
        split_labels = labels[rows]
        split_labels.flags.writeable = False
        out[split] = (standardized, split_labels)
    return out


def load_digits(split: str = "train"):
    """The 'train' or 'test' split as a `bnjax.data.Dataset` (no sub-clusters).

    Example:
      >>> data = load_digits("test")
      >>> len(data), data.image_shape, data.num_classes
      (359, (8, 8, 1), 10)
    """
    from bnjax.data.dataset import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for 'digits', got {split!r}.")
    splits = _splits()
    images, labels = splits[split]
    return Dataset(images, labels, 10, "digits", split, None, splits["mean"], splits["std"])
