"""The in-memory datasets: generated clusters, scikit-learn digits, k-means sub-clusters."""

import dataclasses

import numpy as np
import pytest

from bnjax import data
from bnjax.data import synthetic

SMALL = data.ClusterConfig(num_classes=4, subclusters_per_class=3, train_per_class=300)


def test_clusters_shapes_dtypes_and_standardization():
    train, test = data.load("clusters", "train"), data.load("clusters", "test")
    assert (len(train), len(test)) == (10_000, 2_000)
    assert train.images.shape == (10_000, 16, 16, 3) and train.images.dtype == np.float32
    assert train.labels.dtype == np.int32 and train.subclusters.dtype == np.int32
    assert np.bincount(train.labels).tolist() == [1000] * 10  # balanced classes
    assert set(np.unique(train.subclusters)) == set(range(30))
    np.testing.assert_array_equal(train.subclusters // 3, train.labels)
    np.testing.assert_allclose(train.images.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(axis=(0, 1, 2), dtype=np.float64), 1, atol=1e-5)
    np.testing.assert_allclose(test.images.mean(axis=(0, 1, 2)), 0, atol=0.1)  # same law
    assert not train.images.flags.writeable  # cached arrays are shared: read-only
    assert np.mean(np.abs(np.diff(train.labels)) > 0) > 0.8  # not sorted by class


def test_clusters_are_deterministic_from_the_seed():
    first = synthetic.generate(SMALL, 3)
    synthetic.generate.cache_clear()
    again = synthetic.generate(SMALL, 3)
    other = synthetic.generate(SMALL, 4)
    for split in ("train", "test"):
        for a, b in zip(first[split], again[split], strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first["train"][0], other["train"][0])
    # the test split is a fresh draw, not a copy of training examples
    assert not np.array_equal(first["train"][0][:10], first["test"][0][:10])


def test_subclusters_differ_strongly_in_channel_statistics():
    """What makes clustered batches disturb batch norm: per-sub-cluster channel means spread
    by more than half a population std, and channel stds vary by a factor of several."""
    train = data.load("clusters", "train", config=SMALL)
    means = np.stack([train.images[train.subclusters == g].mean(axis=(0, 1, 2)) for g in range(12)])
    stds = np.stack([train.images[train.subclusters == g].std(axis=(0, 1, 2)) for g in range(12)])
    assert np.all(means.std(axis=0) > 0.4)
    assert np.all(stds.max(axis=0) / stds.min(axis=0) > 2.5)


def test_clusters_classes_are_learnable_from_the_images():
    """A nearest-class-mean classifier on per-image channel-centred images beats chance by far
    (the small CNN of the study reaches about 96% in 300 steps; this keeps the test fast)."""
    config = dataclasses.replace(SMALL, max_shift=0)
    train, test = (data.load("clusters", split, config=config) for split in ("train", "test"))

    def centred(images):  # removes the sub-cluster's colour, keeps the class pattern
        flat = images - images.mean(axis=(1, 2), keepdims=True)
        return (flat / flat.std(axis=(1, 2), keepdims=True)).mean(-1).reshape(len(images), -1)

    features = centred(train.images)
    means = np.stack([features[train.labels == k].mean(0) for k in range(4)])
    predicted = np.argmax(centred(test.images) @ means.T, axis=1)
    assert np.mean(predicted == test.labels) > 0.8


def test_cluster_config_is_validated():
    with pytest.raises(ValueError, match="num_classes"):
        data.ClusterConfig(num_classes=0)
    with pytest.raises(ValueError, match="contrast_range"):
        data.ClusterConfig(contrast_range=0.5)
    with pytest.raises(ValueError, match="seed"):
        data.load("clusters", seed=-1)
    with pytest.raises(ValueError, match="split"):
        data.load("clusters", "validation")


def test_digits():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.image_shape == (8, 8, 1) and train.images.dtype == np.float32
    assert np.all(np.bincount(test.labels) >= 35)  # stratified split
    np.testing.assert_allclose(train.images.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(
        train.images * train.std + train.mean,
        np.round((train.images * train.std + train.mean) * 16) / 16,
        atol=1e-5,
    )
    assert train.subclusters is None
    with pytest.raises(ValueError, match="sub-clusters"):
        train.groups("subcluster")


def test_kmeans_subclusters_for_a_dataset_without_them():
    train, test = data.kmeans_subclusters(
        data.load("digits", "train"), data.load("digits", "test"), per_class=2, seed=0
    )
    for split in (train, test):
        np.testing.assert_array_equal(split.subclusters // 2, split.labels)
        assert set(np.unique(split.subclusters)) == set(range(20))
    sampler = data.make_sampler("clustered", train.groups("subcluster"), batch_size=32)
    assert sampler.num_groups == 20


def test_dataset_take_and_errors():
    dataset = data.load("clusters", "test", config=SMALL)
    batch = dataset.take([3, 1, 2])
    assert set(batch) == {"image", "label", "index", "subcluster"}
    np.testing.assert_array_equal(batch["label"], dataset.labels[[3, 1, 2]])
    with pytest.raises(ValueError, match="by must be"):
        dataset.groups("colour")
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"choose one of \['clusters', 'digits', 'mnist'"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"by must be one of \('class', 'subcluster'\)"):
        dataset.groups("colour")
    with pytest.raises(ValueError, match="config applies"):
        data.load("digits", config=SMALL)
    with pytest.raises(ValueError, match="images"):
        data.Dataset(np.zeros((4, 8)), np.zeros(4, np.int32), 2, "bad", "train")
