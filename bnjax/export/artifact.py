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
(where the weights came from, e.g. a workdir and step); ``files`` {name: SHA-256} of every
other file of the artifact; ``checksum``, the SHA-256 of the manifest itself (its canonical
JSON without this key). `verify` checks both: a file or a manifest entry changed since export
fails, and so does a manifest without them.

Every file name in the manifest is confined to the artifact: `member` refuses a name that
leaves the directory (absolute, ``..``, or a symbolic link pointing out of it), so reading an
artifact never reads a file of someone else's. `check_replaceable` says whether a directory
is an artifact and nothing else, the only kind of directory ``overwrite=True`` replaces.

Example:
  >>> crc32(np.array([1.0, 2.0], np.float32)) == crc32(np.array([1.0, 2.0]))   # float32 bytes
  True
"""

from __future__ import annotations

import hashlib
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
CHECKSUM, FILES = "checksum", "files"


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


def file_digest(path: str) -> str:
    """The SHA-256 (hex) of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The SHA-256 of a manifest's canonical JSON (sorted keys), its own ``checksum`` left out.

    Example:
      >>> manifest_digest({"a": 1, "checksum": "x"}) == manifest_digest({"a": 1})
      True
    """
    body = {key: value for key, value in manifest.items() if key != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    """Writes ``manifest.json`` into `directory`: the `MANIFEST_FORMAT` tag, ``files`` (the
    SHA-256 of every other file in `directory`) and the manifest's own ``checksum``."""
    names = sorted(name for name in os.listdir(directory) if name != MANIFEST)
    files = {name: file_digest(os.path.join(directory, name)) for name in names}
    full = {**manifest, "format": MANIFEST_FORMAT, FILES: files}
    full[CHECKSUM] = manifest_digest(full)
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump(full, handle, indent=2, sort_keys=True)
        handle.write("\n")


def member(directory: str, name) -> str:
    """The path of the artifact's file `name`; ArtifactError when it is outside `directory`.

    A manifest names its files relative to the artifact; an absolute name, a ``..`` or a
    symbolic link that resolves outside the directory would make a check read (and vouch for)
    a file that is not part of the artifact.

    Example:
      >>> member("/srv/artifact", "../other/model.onnx")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      bnjax.export.artifact.ArtifactError: the file '../other/model.onnx' ... is outside the ...
    """
    root = os.path.realpath(directory)
    inside = isinstance(name, str) and bool(name) and not os.path.isabs(name)
    path = os.path.realpath(os.path.join(root, name)) if inside else ""
    if not inside or os.path.dirname(path) != root:
        raise ArtifactError(
            f"the file {name!r} named by the manifest is outside the artifact {directory!r}; "
            f"an artifact's files are in its directory (re-export it)."
        )
    return path


def check_replaceable(directory: str) -> None:
    """Raises FileExistsError unless `directory` is a serving artifact and holds nothing else.

    A directory is replaceable when it has a manifest of ours and every entry in it is a file
    of the artifact (the manifest, the program, the calibration arrays, the statistics):
    a run's workdir, a folder that holds an artifact among other things, or an artifact a
    user added files to are never deleted.

    Example:
      >>> import tempfile
      >>> check_replaceable(tempfile.mkdtemp())  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      FileExistsError: ... is not a bnjax serving artifact (no manifest.json of ours)...
    """
    advice = "choose another `out`, or remove it yourself"
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise FileExistsError(
            f"{directory!r} exists and is not a directory (or is a symbolic link); only a "
            f"serving artifact is replaced by overwrite: {advice}."
        )
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        raise FileExistsError(
            f"{directory!r} is not a bnjax serving artifact (no manifest.json of ours), so "
            f"overwrite does not replace it: {advice}."
        ) from None
    known = {MANIFEST, INPUTS, OUTPUTS, STATISTICS, *manifest.get(FILES, {})}
    program = manifest["program"].get("file") if isinstance(manifest["program"], dict) else None
    known.add(program)
    others = sorted(
        name
        for name in os.listdir(directory)
        if name not in known
        or not os.path.isfile(os.path.join(directory, name))
        or os.path.islink(os.path.join(directory, name))
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if others[5:] else "")
        raise FileExistsError(
            f"{directory!r} holds files that are not part of its artifact ({shown}), so "
            f"overwrite does not replace it: {advice}."
        )


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of the artifact at `directory`; ArtifactError when it is not one.

    Example:
      >>> read_manifest("/nonexistent")
      Traceback (most recent call last):
      ...
      bnjax.export.artifact.ArtifactError: '/nonexistent' is not a directory (an artifact is one).
    """
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory!r} is not a directory (an artifact is one).")
    path = member(directory, MANIFEST)
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
    path = member(directory, name)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {os.path.join(directory, name)}: {error}") from None


def read_statistics(directory: str) -> dict[str, np.ndarray]:
    """{'PATH/mean' | 'PATH/var': array} of statistics.npz; ArtifactError when unreadable."""
    path = member(directory, STATISTICS)
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {os.path.join(directory, STATISTICS)}: {error}") from None
