"""Pytree leaves as checkpoints store them: names, host copies, checksums, restore targets.

Leaf names join the keys of a leaf's path with "/" (dict keys, attribute names, sequence
indices), so a NamedTuple or dataclass state and the plain dicts orbax restores without a
target give the same names.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def leaf_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts) or "<root>"


def flatten(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def host_copy(leaf) -> np.ndarray | None:
    """A host copy of a stored leaf; None for arrays that span several processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return None
    return np.asarray(leaf)


def crc32(array: np.ndarray | None) -> int | None:
    if array is None:
        return None
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _finite(leaf, host: np.ndarray | None) -> bool:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return True
    if host is None:
        return bool(jnp.all(jnp.isfinite(leaf)))
    return bool(np.all(np.isfinite(host)))


def _abstract(name: str, leaf):
    """The orbax restore target for one target leaf."""
    if is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(leaf)
    raise TypeError(f"restore target leaf {name!r}: unsupported type {type(leaf).__name__}")


def prepare(state: Any) -> tuple[Any, dict, list[str]]:
    """(tree to store, manifest entries {name: shape, dtype, crc32[, prng_impl]}, problems).

    Typed PRNG keys become their key data; scalars become numpy arrays; problems name the
    floating leaves holding NaN/inf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    stored, entries, bad = [], {}, []
    for path, leaf in leaves:
        name = leaf_name(path)
        if name in entries:
            raise ValueError(f"two leaves of the state are both named {name!r}")
        impl = str(jax.random.key_impl(leaf)) if is_key(leaf) else None
        if impl is not None:
            leaf = jax.random.key_data(leaf)
        elif not isinstance(leaf, jax.Array):
            leaf = np.asarray(leaf)
        host = host_copy(leaf)
        if not _finite(leaf, host):
            bad.append(f"{name} (non-finite)")
        entry = {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "crc32": crc32(host)}
        entries[name] = entry if impl is None else {**entry, "prng_impl": impl}
        stored.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, stored), entries, bad


def restore_plan(target: Any) -> tuple[list[str], list, list, Any]:
    """(names, target leaves, orbax restore targets, treedef) of a restore target."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [leaf_name(path) for path, _ in leaves]
    abstract = [_abstract(name, leaf) for name, (_, leaf) in zip(names, leaves, strict=True)]
    return names, [leaf for _, leaf in leaves], abstract, treedef


def mismatches(entries: dict, names: list[str], abstract: list) -> list[str]:
    """How a checkpoint's manifest entries and a restore target disagree, leaf by leaf."""
    problems = [f"{name}: not in the checkpoint" for name in names if name not in entries]
    problems += [f"{name}: not in the target" for name in entries if name not in names]
    for name, leaf in zip(names, abstract, strict=True):
        saved = entries.get(name)
        if saved and [saved["shape"], saved["dtype"]] != [list(leaf.shape), str(leaf.dtype)]:
            problems.append(
                f"{name}: saved {tuple(saved['shape'])} {saved['dtype']}, "
                f"target {tuple(leaf.shape)} {leaf.dtype}"
            )
    return problems
