"""The serving artifact on disk: a directory that `verify` can check without the model code.

    ARTIFACT/
      manifest.json             what everything below is (the schema is `MANIFEST_FORMAT`)
      model.stablehlo           the program: serialized ``jax.export`` (StableHLO), or
      model.onnx                ... an ONNX graph (`bnjax.export.formats`)
      calibration_inputs.npy    a batch of real inputs, (N, ...) with N >= 2
      calibration_outputs.npy   the in-memory evaluation-mode (unfolded) model's outputs on it
      statistics.npz            every batch norm's running 'PATH/mean' and 'PATH/var'

``manifest.json`` holds: ``format`` (`MANIFEST_FORMAT`); ``program`` {format, file,
platforms}; ``input`` and ``output`` {shape, dtype} with the batch dimension written ``"b"``
(any batch size); ``statistics`` {norm path: {mean|var: {shape, crc32, finite}}} (CRC32 of the
little-endian float32 bytes, as in `bnjax.train.checkpoints`); ``fold`` {folded: {norm: layer},
affine: {norm: reason}}; ``calibration`` {inputs, outputs, examples, rtol, scale, atol};
``versions`` {bnjax, jax, jaxlib, flax, numpy, and the ONNX tools when used}; ``source``
(where the weights came from, e.g. a workdir and step).

Example:
  >>> crc32(np.array([1.0, 2.0], np.float32)) == crc32(np.array([1.0, 2.0]))   # float32 bytes
  True
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

MANIFEST_FORMAT = "bnjax-serving/1"
MANIFEST = "manifest.json"
INPUTS, OUTPUTS, STATISTICS = "calibration_inputs.npy", "calibration_outputs.npy", "statistics.npz"
STAT_NAMES = ("mean", "var")


class ArtifactError(ValueError):
    """The artifact cannot be read: missing or malformed files (`verify` exits 2).

    Example:
      >>> try:
      ...     read_manifest("/nonexistent")
      ... except ArtifactError as error:
      ...     print("unreadable:", error)
      unreadable: '/nonexistent' is not a directory (an artifact is one).
    """


def crc32(array) -> int:
    """CRC32 of an array's values as little-endian float32 (the statistics' stored dtype)."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(array, "<f4")).tobytes())


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of bnjax, jax, jaxlib, flax, numpy and `extra` packages."""
    found = {}
    for name in ("bnjax", "jax", "jaxlib", "flax", "numpy", *extra):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def array_spec(shape, dtype) -> dict[str, Any]:
    """{shape: ['b', ...], dtype}: the leading (batch) dimension symbolic."""
    return {"shape": ["b", *(int(d) for d in shape[1:])], "dtype": np.dtype(dtype).name}


def write_statistics(directory: str, statistics: Mapping[str, Mapping[str, Any]]) -> dict:
    """Writes statistics.npz and returns the manifest's {path: {name: {shape, crc32, finite}}}."""
    arrays, entries = {}, {}
    for path, stats in statistics.items():
        entries[path] = {}
        for name in STAT_NAMES:
            value = np.asarray(stats[name], np.float32)
            arrays[f"{path}/{name}"] = value
            entries[path][name] = {
                "shape": list(value.shape),
                "crc32": crc32(value),
                "finite": bool(np.all(np.isfinite(value))),
            }
    np.savez(os.path.join(directory, STATISTICS), **arrays)
    return entries


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    """Writes ``manifest.json`` (with the `MANIFEST_FORMAT` tag) into `directory`."""
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump({"format": MANIFEST_FORMAT, **manifest}, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the artifact at `directory`; ArtifactError when it is not one.

    Example:
      >>> read_manifest("/nonexistent")
      Traceback (most recent call last):
      ...
      bnjax.export.artifact.ArtifactError: '/nonexistent' is not a directory (an artifact is one).
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory!r} is not a directory (an artifact is one).")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{path} is not a bnjax serving manifest (format {found!r}, expected "
            f"{MANIFEST_FORMAT!r})."
        )
    missing = [
        key
        for key in ("program", "input", "output", "statistics", "calibration")
        if key not in manifest
    ]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}.")
    return manifest


def read_array(directory: str, name: str) -> np.ndarray:
    """The .npy array `name` of the artifact; ArtifactError when it cannot be read."""
    try:
        return np.load(os.path.join(directory, name), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {os.path.join(directory, name)}: {error}") from None


def read_statistics(directory: str) -> dict[str, np.ndarray]:
    """{'PATH/mean' | 'PATH/var': array} of statistics.npz; ArtifactError when unreadable."""
    try:
        with np.load(os.path.join(directory, STATISTICS), allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {os.path.join(directory, STATISTICS)}: {error}") from None
