"""The loop that `recalibrate`, `recalibrate_nnx` and `recalibrate_states` share.

Batches go through one backend's jitted ``moments`` (see `_backends`), whose per-layer moments
are merged exactly into totals (`population.accumulate`); ``mode="train"`` takes one pass,
``mode="full_batch"`` repeats passes over the batches kept in memory, each from the statistics
of the pass before, until a pass changes nothing (bit for bit) or every layer had its pass.
"""

from __future__ import annotations

import itertools
import numbers
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.lifecycle._backends import MODES
from bnjax.lifecycle.layers import path_str
from bnjax.lifecycle.population import accumulate, empty_totals


def _progress(iterable, *, total, description: str, enabled: bool):
    if not enabled:
        return iterable
    from bnjax.progress import track

    return track(iterable, description, total=total, log=lambda line: print(line, file=sys.stderr))


def _one_pass(moments, step, check, current, batches, *, total, description, progress):
    totals = None
    for index, batch in enumerate(
        _progress(batches, total=total, description=description, enabled=progress)
    ):
        index = jnp.asarray(index, jnp.int32)
        if totals is None:
            shapes = jax.eval_shape(moments, current, batch, index)
            check(current, shapes)
            totals = empty_totals(shapes)
        totals = step(totals, current, batch, index)
    if totals is None:
        raise ValueError("`batches` gave no batch to recalibrate on.")
    return totals


def _make_step(backend, jit: bool, axis_name):
    """(moments, step): one batch's per-layer moments, and their accumulation into totals."""
    if axis_name is None:
        moments = backend.moments

        def step(totals, current, batch, index):
            return accumulate(totals, moments(current, batch, index))

        return moments, jax.jit(step) if jit else step
    mapped = jax.pmap(backend.moments, axis_name=axis_name, in_axes=(None, 0, None))

    def moments(current, batch, index):  # replicated over devices: keep one copy
        return jax.tree.map(lambda leaf: leaf[0], mapped(current, batch, index))

    merge = jax.jit(accumulate) if jit else accumulate
    return moments, lambda totals, current, batch, index: merge(
        totals, moments(current, batch, index)
    )


def _same(a: dict, b: dict) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for key in a
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True)
    )


def _checked_options(mode: str, num_batches) -> int | None:
    """`num_batches` as an int (or None), after checking it and `mode`."""
    if mode not in MODES:
        raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
    if num_batches is None:
        return None
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral):
        raise TypeError(
            f"`num_batches` must be a positive int or None (all batches), got "
            f"{type(num_batches).__name__} {num_batches!r}."
        )
    if num_batches < 1:
        raise ValueError(
            f"`num_batches` must be >= 1 (or None for all batches), got {num_batches}."
        )
    return int(num_batches)


def run_passes(backend, current, batches, *, mode, num_batches, axis_name, jit, progress):
    """The loop all three front ends share: `current` with every layer's statistics replaced
    by the population statistics of its inputs over `batches` (in `backend`'s form)."""
    num_batches = _checked_options(mode, num_batches)
    backend.mode = mode
    try:
        iter(batches)
    except TypeError:
        raise TypeError(
            f"`batches` must be an iterable of model inputs (a list of arrays, a generator), "
            f"got {type(batches).__name__}."
        ) from None
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if num_batches is None else min(num_batches, len(batches))
    batches = itertools.islice(batches, num_batches)
    moments, step = _make_step(backend, jit, axis_name)

    def run(current, batches, description):
        return _one_pass(
            moments,
            step,
            backend.check,
            current,
            batches,
            total=total,
            description=description,
            progress=progress,
        )

    if mode == "train":
        totals = run(current, batches, "recalibrating")
        result = backend.write(current, totals, final=True)
    else:
        batches = list(batches)
        total = len(batches)
        totals = run(current, batches, "recalibrating, pass 1")
        for number in range(2, len(totals) + 1):
            following = backend.write(current, totals, final=False)
            next_totals = run(following, batches, f"recalibrating, pass {number}")
            settled = _same(
                backend.statistics(backend.write(following, next_totals, final=False)),
                backend.statistics(following),
            )
            current, totals = following, next_totals
            if settled:
                break
        result = backend.write(current, totals, final=True)
    _warn_about(backend, totals)
    return result


def _warn_about(backend, totals) -> None:
    unseen = [key for key in backend.all_layers if key not in totals]
    if unseen:
        warnings.warn(
            f"recalibrate: {len(unseen)} batch-norm layer(s) were never called and keep their "
            f"statistics: {[path_str(k) if isinstance(k, tuple) else k for k in unseen]}",
            stacklevel=4,
        )
    empty = [key for key, total in totals.items() if not bool(jnp.all(total.moments.count > 0))]
    if empty:
        warnings.warn(
            f"recalibrate: layer(s) {empty} saw no valid value in some channel (all batches "
            f"masked or non-finite); those channels keep their statistics.",
            stacklevel=4,
        )
