"""TFDS through `tfds.data_source`, offline with `tfds.testing.mock_data`, and the grain path:
the same batches as the in-memory path, per process; a missing dataset says how to prepare it."""

import functools

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain.python")

from bnjax import data  # noqa: E402
from bnjax.data import grain_pipeline, tfds_source  # noqa: E402


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))],
)
def test_mock_tfds_loads_into_memory(name, shape):
    with tfds.testing.mock_data(num_examples=40):
        train = data.load(name, "train")
        again = data.load(name, "train")
        raw = tfds_source.open_source(name, "train")
        first = raw[0]
    assert len(train) == 40 and train.image_shape == shape and train.num_classes == 10
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    expected = (first["image"].astype(np.float32) / 255 - train.mean) / train.std
    np.testing.assert_allclose(train.images[0], expected, rtol=1e-6)
    assert train.labels[0] == first["label"]
    np.testing.assert_array_equal(train.images, again.images)  # mock data are deterministic


@pytest.mark.parametrize("kind", ["uniform", "balanced", "skewed", "clustered"])
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_grain_loader_gives_the_in_memory_batches(name, kind):
    with tfds.testing.mock_data(num_examples=48):
        source = tfds_source.open_source(name, "train")
        labels = tfds_source.read_labels(source)
        sampler = data.make_sampler(kind, labels, batch_size=8, seed=1)
        memory = data.load(name, "train")
        np.testing.assert_array_equal(labels, memory.labels)
        for process in range(2):
            loader = grain_pipeline.grain_loader(
                source,
                sampler,
                functools.partial(tfds_source.preprocess, name),
                num_epochs=2,
                process_index=process,
                process_count=2,
            )
            through_grain = list(loader)
            in_memory = list(
                data.batches(memory, sampler, num_epochs=2, process_index=process, process_count=2)
            )
            assert len(through_grain) == len(in_memory) == 2 * 6
            for ours, theirs in zip(through_grain, in_memory, strict=True):
                assert ours["image"].shape == (4, *memory.image_shape)
                np.testing.assert_array_equal(ours["index"], theirs["index"])
                np.testing.assert_array_equal(ours["label"], theirs["label"])
                np.testing.assert_allclose(ours["image"], theirs["image"], rtol=1e-6)


def test_grain_loader_resumes_from_its_state():
    with tfds.testing.mock_data(num_examples=32):
        source = tfds_source.open_source("mnist", "train")
        sampler = data.make_sampler("uniform", len(source), batch_size=4, seed=0)
        loader = grain_pipeline.grain_loader(source, sampler, num_epochs=2)
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
        state = iterator.get_state()
        rest = [batch["index"] for batch in iterator]
        resumed = iter(grain_pipeline.grain_loader(source, sampler, num_epochs=2))
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(rest), np.stack([b["index"] for b in resumed]))
    assert len(rest) == 2 * 8 - 5


@pytest.mark.slow
def test_grain_worker_processes_keep_the_batches():
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags
    with tfds.testing.mock_data(num_examples=48):
        source = tfds_source.open_source("cifar10", "train")
        sampler = data.make_sampler("skewed", tfds_source.read_labels(source), 8, skew=0.5)
        loader = grain_pipeline.grain_loader(source, sampler, worker_count=2)
        indices = [batch["index"] for batch in loader]
    np.testing.assert_array_equal(np.stack(indices), sampler.epoch(0))


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(tfds_source.DatasetNotPreparedError) as error:
        data.load("fashion_mnist", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "fashion_mnist" in message and str(tmp_path) in message
    assert "tfds.data_source('fashion_mnist'" in message and "TFDS_DATA_DIR" in message
    assert "data_dir" in message and "never downloads" in message
    assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(ValueError, match="supports"):
        tfds_source.open_source("imagenet2012")


def test_source_and_sampler_sizes_must_agree():
    records = [{"x": np.float32(i)} for i in range(10)]
    sampler = data.make_sampler("uniform", 12, batch_size=4)
    with pytest.raises(ValueError, match="12 examples"):
        grain_pipeline.grain_loader(records, sampler)
