"""The checksum manifest of a checkpoint, and the pytree leaves it names: names, CRC32s,
restore targets, mismatches.

A leaf's name is its key path written by ``jax.tree_util.keystr(path, simple=True,
separator="/")`` (dict keys, attribute names, sequence indices), so a NamedTuple or dataclass
state and the plain dicts orbax restores without a target give the same names. Orbax stores
typed PRNG keys itself (their key data plus the implementation's name) and knows every
leaf's shape and dtype (its item metadata); what bnjax adds is a CRC32 per leaf, kept in a
JSON manifest beside the state.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def leaf_name(path) -> str:
    """'params/dense/kernel' for a key path; '<root>' for a state that is one leaf."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def named_leaves(tree) -> list[tuple[str, Any]]:
    """[(name, leaf)] of a pytree, in flattening order."""
    return [(leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_key(leaf) -> bool:
    """Whether a leaf is a typed PRNG key (``jax.random.key``), stored as its key data."""
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def host_copy(leaf) -> np.ndarray | None:
    """The bytes a leaf's checksum covers (a typed key's key data), on the host; None for
    arrays that span several processes."""
    if is_key(leaf):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return None
    return np.asarray(leaf)


def crc32(array: np.ndarray | None) -> int | None:
    """CRC32 of an array's bytes in C order (None for None)."""
    if array is None:
        return None
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


FORMAT = "bnjax.checkpoint/2"
"""The manifest's format: {"format", "step", "leaves": {name: {"crc32": int or None}}}."""
OLD_FORMATS = ("bnjax.checkpoint/1",)  # shapes, dtypes and PRNG key data in the manifest


def manifest_of(step: int, checksums: dict[str, int | None]) -> dict:
    """The JSON manifest of a step: its format, step number and each leaf's checksum."""
    leaves = {name: {"crc32": checksum} for name, checksum in checksums.items()}
    return {"format": FORMAT, "step": step, "leaves": leaves}


def manifest_checksums(manifest: Any, step: int) -> dict[str, int | None]:
    """{leaf name: crc32} of a manifest read back; ValueError unless it is step's manifest."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError("no valid manifest item (not written by Checkpointer?)")
    if manifest.get("step") != step:
        raise ValueError(f"manifest is for step {manifest.get('step')}, not {step}")
    return {name: entry["crc32"] for name, entry in manifest["leaves"].items()}


def check_checksums(state: Any, checksums: dict[str, int | None]) -> None:
    """Raises ValueError unless `state` has the manifest's leaves, each with its CRC32.

    Leaves without a checksum (arrays spanning several processes) are not checked.
    """
    leaves = named_leaves(state)
    names = {name for name, _ in leaves}
    if names != set(checksums):
        missing, extra = sorted(set(checksums) - names), sorted(names - set(checksums))
        raise ValueError(
            "restored leaves differ from the manifest's: "
            + "; ".join(
                [f"{name!r} in the manifest, not restored" for name in missing[:4]]
                + [f"{name!r} restored, not in the manifest" for name in extra[:4]]
            )
        )
    for name, leaf in leaves:
        host = host_copy(leaf)
        if checksums[name] is not None and host is not None and crc32(host) != checksums[name]:
            raise ValueError(f"leaf {name!r} fails its checksum (corrupt data)")


def target_types(target: Any, restored: Any) -> Any:
    """`restored` with the target's Python scalars as Python scalars (orbax gives arrays)."""

    def like(original, leaf):
        if isinstance(original, (bool, int, float)):
            return type(original)(np.asarray(leaf).item())
        return leaf

    return jax.tree.map(like, target, restored)


def _finite(leaf, host: np.ndarray | None) -> bool:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return True
    if host is None:
        return bool(jnp.all(jnp.isfinite(leaf)))
    return bool(np.all(np.isfinite(host)))


def prepare(state: Any) -> tuple[Any, dict[str, int | None], list[str]]:
    """(tree to store, {leaf name: crc32}, problems) of a state about to be saved.

    Python and numpy scalars become numpy arrays (orbax stores arrays); problems name the
    floating leaves holding NaN/inf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    stored, checksums, bad = [], {}, []
    for path, leaf in leaves:
        name = leaf_name(path)
        if name in checksums:
            raise ValueError(f"two leaves of the state are both named {name!r}")
        if not isinstance(leaf, jax.Array):
            leaf = np.asarray(leaf)
        host = host_copy(leaf)
        if not _finite(leaf, host):
            bad.append(f"{name} (non-finite)")
        checksums[name] = crc32(host)
        stored.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, stored), checksums, bad


def restore_target(target: Any) -> Any:
    """The orbax restore target of a target pytree: arrays (typed keys included) become
    ``jax.ShapeDtypeStruct`` with their sharding, numpy arrays and scalars numpy arrays."""

    def abstract(path, leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
            return np.asarray(leaf)
        raise TypeError(
            f"restore target leaf {leaf_name(path)!r}: unsupported type {type(leaf).__name__}"
        )

    return jax.tree_util.tree_map_with_path(abstract, target)


def _stored_as(leaf) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) as orbax's metadata gives them (a typed key: its key data's)."""
    if is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(leaf.shape), str(np.dtype(leaf.dtype))


def mismatches(saved: Any, target: Any) -> list[str]:
    """How a checkpoint's item metadata (orbax's tree of array metadata) and a restore
    target disagree, leaf by leaf: missing or extra leaves, other shapes or dtypes."""
    saved, target = dict(named_leaves(saved)), dict(named_leaves(target))
    problems = [f"{name}: not in the checkpoint" for name in target if name not in saved]
    problems += [f"{name}: not in the target" for name in saved if name not in target]
    for name, leaf in target.items():
        if name not in saved:
            continue
        (shape, dtype), (saved_shape, saved_dtype) = _stored_as(leaf), _stored_as(saved[name])
        if (shape, dtype) != (saved_shape, saved_dtype):
            problems.append(f"{name}: saved {saved_shape} {saved_dtype}, target {shape} {dtype}")
    return problems
