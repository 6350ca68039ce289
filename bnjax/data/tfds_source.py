"""TFDS image datasets through `tfds.data_source`: random access to prepared ArrayRecord files,
read with NumPy, without TensorFlow.

Nothing is downloaded here (`download=False`): a dataset must have been prepared in
ArrayRecord format under `data_dir` (default $TFDS_DATA_DIR, else ~/tensorflow_datasets),
on a machine with network access (building mnist and cifar10 reads their downloaded files
with TensorFlow, so that machine needs it; the training machines do not):

    pip install tensorflow tensorflow-datasets array-record
    python -c "import tensorflow_datasets as tfds; tfds.data_source('mnist', data_dir='DIR')"

(`tfds.data_source` with its default `download=True` prepares ArrayRecord files), then copy
DIR to the training machines and set TFDS_DATA_DIR=DIR or pass `data_dir=DIR`. A missing or
unreadable dataset raises `DatasetNotPreparedError` with these instructions.

`open_source` gives the raw random-access source (records {'image': uint8 (H, W, C),
'label': int}) for `bnjax.data.pipeline.grain_loader`; `load_tfds` reads a split into a
standardized in-memory `Dataset` (fine for these small datasets; cifar10's train split takes
about 600 MB as float32).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """What bnjax needs to know about a TFDS image-classification dataset.

    mean and std (C,) are per-channel statistics of the training split's pixels in [0, 1]
    (the usual published constants), used to standardize both splits.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


TFDS_DATASETS = {
    "mnist": TfdsSpec(10, (28, 28, 1), (0.1307,), (0.3081,)),
    "fashion_mnist": TfdsSpec(10, (28, 28, 1), (0.2860,), (0.3530,)),
    "cifar10": TfdsSpec(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not prepared (in ArrayRecord format) where bnjax looked for it, or
    the packages that read it are not installed. `str()` has the full instructions;
    `summary()` says what to do in one line (what the training script prints)."""

    def __init__(self, message: str, one_line: str):
        super().__init__(message)
        self.one_line = one_line

    def summary(self) -> str:
        """The error and its fix in one line."""
        return self.one_line


def _spec(name: str) -> TfdsSpec:
    if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown TFDS dataset {name!r}; bnjax supports {list(TFDS_DATASETS)}.")
    return TFDS_DATASETS[name]


def not_prepared_message(name: str, data_dir: str | None, cause: BaseException | None = None):
    """The instructions `DatasetNotPreparedError` carries."""
    where = data_dir or "$TFDS_DATA_DIR (else ~/tensorflow_datasets)"
    reason = f"\nTFDS said: {type(cause).__name__}: {cause}" if cause is not None else ""
    return (
        f"TFDS dataset '{name}' is not prepared in ArrayRecord format under {where}, and bnjax "
        "never downloads data. On a machine with network access, prepare it with\n"
        "    pip install tensorflow tensorflow-datasets array-record\n"
        f"    python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}', "
        "data_dir='DIR')\"\n"
        f"or `tfds build {name} --file_format=array_record --data_dir=DIR`, then copy DIR "
        "here and set TFDS_DATA_DIR=DIR or pass data_dir=DIR (reading needs "
        "tensorflow-datasets, array-record and pillow, not TensorFlow). The datasets that need "
        f"no preparation are 'clusters' and 'digits'.{reason}"
    )


def open_source(name: str, split: str = "train", *, data_dir: str | None = None):
    """The TFDS random-access source of a prepared dataset: len() and [i] -> {'image': uint8
    (H, W, C), 'label': int, ...}. Raises `DatasetNotPreparedError` if it is not there."""
    _spec(name)
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        fix = "pip install 'bnjax[data]' (tensorflow-datasets, array-record, pillow; no TensorFlow)"
        raise DatasetNotPreparedError(
            f"reading TFDS dataset '{name}' needs tensorflow-datasets: {fix}.", f"{error}; {fix}."
        ) from error
    # TFDS logs a warning per incomplete folder while it looks; the error below says it all.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            builder_kwargs={"file_format": "array_record"},
        )
    except Exception as error:  # TFDS signals a missing dataset with several error types
        where = data_dir or "$TFDS_DATA_DIR (else ~/tensorflow_datasets)"
        one_line = (
            f"TFDS dataset '{name}' is not prepared under {where}, and bnjax never downloads "
            f"data: run `tfds build {name} --file_format=array_record --data_dir=DIR` on a "
            "machine with network access, copy DIR here and pass --config.data_dir=DIR "
            "(README, 'Data')."
        )
        raise DatasetNotPreparedError(
            not_prepared_message(name, data_dir, error), one_line
        ) from error
    finally:
        absl_logger.setLevel(level)


def standardize(name: str, images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, C) pixels -> float32 (pixels / 255 - mean) / std with `name`'s
    constants."""
    spec = _spec(name)
    mean, std = np.float32(spec.mean), np.float32(spec.std)
    return (np.asarray(images, np.float32) / np.float32(255) - mean) / std


def preprocess(name: str, example: dict) -> dict[str, np.ndarray]:
    """One raw record -> {'image': float32 (H, W, C) standardized, 'label': int32 ()}."""
    return {
        "image": standardize(name, example["image"]),
        "label": np.asarray(example["label"], np.int32),
    }


def read_labels(source) -> np.ndarray:
    """(N,) int32 labels of every record of a source (decodes each record once)."""
    return np.array([source[i]["label"] for i in range(len(source))], np.int32)


def load_tfds(name: str, split: str = "train", *, data_dir: str | None = None):
    """A split of a prepared TFDS dataset, read record by record into a `Dataset`."""
    from bnjax.data.dataset import Dataset

    spec = _spec(name)
    source = open_source(name, split, data_dir=data_dir)
    images = np.empty((len(source), *spec.image_shape), np.uint8)
    labels = np.empty(len(source), np.int32)
    for i in range(len(source)):
        record = source[i]
        images[i], labels[i] = record["image"], record["label"]
    return Dataset(
        standardize(name, images),
        labels,
        spec.num_classes,
        name,
        split,
        None,
        np.float32(spec.mean),
        np.float32(spec.std),
    )
