"""Check the batch-norm statistics of a checkpoint or variables tree before serving it.

The failures this catches are silent at load time and ruin evaluation: a checkpoint of the
params alone (the running statistics dropped), statistics never updated because training never
ran with ``mutable=['batch_stats']`` (exactly the initial mean 0 / var 1, or a count of 0 for
layers built with ``track_counters=True``), NaN or
infinite statistics from a diverged run, a negative variance from a buggy update or a bad
merge, and statistics whose shape does not match the layer's.

    report = validate_statistics(variables)              # or load_checkpoint(path)
    print(report); assert report.ok

    $ python -m bnjax.lifecycle validate WORKDIR    # exit 0 ok, 1 problems, 2 unreadable/corrupt

(The command reads ``WORKDIR/checkpoints``, checks `bnjax.train.Checkpointer` steps against
their checksums whatever the path names, and says which step it read; see
``bnjax/lifecycle/__main__.py``. `load_checkpoint` is `bnjax.lifecycle.checkpoint_reading`'s.)

Where the statistics are looked for: every 'batch_stats' collection anywhere in the tree (with
its sibling 'params' for scale/bias at the same module path; 'count'/'skipped' beside the
statistics when the layer keeps them), and every dict (or `BatchNormState`) holding
'mean'/'var' directly (functional states, nnx states: ``nnx.state(model)``). Train states
(``flax.struct`` dataclasses) are read through ``flax.serialization.to_state_dict``;
'opt_state' subtrees are skipped. Statistics written as lists of numbers are read as arrays.
A training state ('params' beside 'opt_state') without 'batch_stats' is the state of a model
with no batch norm (group, layer or no norm): nothing to check, OK with a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.serialization
import numpy as np
from flax import nnx

from bnjax.lifecycle.checkpoint_reading import load_checkpoint
from bnjax.lifecycle.layers import (
    PARAMS,
    STATS,
    Path,
    get_path,
    path_str,
)

__all__ = ["LayerReport", "ValidationReport", "load_checkpoint", "validate_statistics"]

_STAT_NAMES = ("mean", "var", "renorm_mean", "renorm_var")
_SKIP = ("opt_state",)


class LayerReport(NamedTuple):
    """One batch-norm layer: its path, statistics shape, counters, problems and notes.

    Example:
      >>> tree = {"batch_stats": {"bn": {"mean": np.zeros(2), "var": np.array([1.0, -1.0])}}}
      >>> layer = validate_statistics(tree).layers[0]
      >>> layer.path, layer.features, layer.count, layer.problems     # no counters: None
      ('bn', (2,), None, ('negative var in 1 channel(s) (min -1)',))
    """

    path: str
    features: tuple[int, ...] | None
    count: int | None
    skipped: int | None
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclasses.dataclass
class ValidationReport:
    """Per-layer results and problems of the tree as a whole; ``ok`` when there are none.

    Example:
      >>> report = validate_statistics({"params": {"dense": {"kernel": np.ones((2, 2))}}})
      >>> report.ok, report.layers, report.problems[0][:30]     # a problem of the whole tree
      (False, [], 'no batch-norm statistics found')
    """

    layers: list[LayerReport]
    problems: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)  # of the tree; not failures

    @property
    def ok(self) -> bool:
        return not self.problems and not any(layer.problems for layer in self.layers)

    def format(self, only_problems: bool = False) -> str:
        """A table, one line per layer (or per failing layer), then a summary line."""
        rows = [("layer", "features", "count", "skipped", "status")]
        for layer in self.layers:
            if only_problems and not layer.problems:
                continue
            status = "FAIL " + "; ".join(layer.problems) if layer.problems else "ok"
            if layer.notes:
                status += " (" + "; ".join(layer.notes) + ")"
            rows.append(
                (
                    layer.path,
                    "-" if layer.features is None else str(layer.features),
                    "-" if layer.count is None else str(layer.count),
                    "-" if layer.skipped is None else str(layer.skipped),
                    status,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
            for row in rows
        ]
        lines = lines if self.layers else []  # no table of no layers
        lines += [f"problem: {problem}" for problem in self.problems]
        lines += [f"note: {note}" for note in self.notes]
        failing = sum(bool(layer.problems) for layer in self.layers)
        lines.append(
            f"{len(self.layers)} batch-norm layer(s), {failing} with problems"
            + (f", {len(self.problems)} problem(s) overall" if self.problems else "")
            + (": OK" if self.ok else ": FAILED")
        )
        return "\n".join(lines)

    __str__ = format


def _plain(tree):
    """Dicts all the way down: nnx states/modules, train states and NamedTuples converted;
    lists of numbers become arrays."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return flax.serialization.to_state_dict(_numbers_as_arrays(tree))


def _is_numbers(node) -> bool:
    """A (nested) plain list or tuple of numbers, e.g. a mean written as [0.5, 0.5]."""
    return (
        type(node) in (list, tuple)
        and len(node) > 0
        and all(isinstance(item, (int, float, np.number)) or _is_numbers(item) for item in node)
    )


def _numbers_as_arrays(node):
    """`node` with its lists of numbers as numpy arrays: flax's state dicts would make a list
    a dict {'0': ..., '1': ...}, where no statistics are looked for."""
    if _is_numbers(node):
        return np.asarray(node)
    if isinstance(node, Mapping):
        return {key: _numbers_as_arrays(value) for key, value in node.items()}
    if type(node) in (list, tuple):
        return type(node)(_numbers_as_arrays(item) for item in node)
    return node


def _is_layer(node) -> bool:
    return isinstance(node, Mapping) and any(
        name in node and not isinstance(node[name], Mapping) for name in _STAT_NAMES
    )


def _stat_layers(collection) -> list[Path]:
    found = []

    def visit(node, path):
        if _is_layer(node):
            found.append(path)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, (*path, key))

    visit(collection, ())
    return found


def _find(tree) -> dict[Path, tuple[Mapping, Mapping, Mapping]]:
    """{path: (statistics, params, counters)} for every batch-norm layer in a plain tree."""
    layers = {}

    def visit(node, path):
        if not isinstance(node, Mapping):
            return
        if isinstance(node.get(STATS), Mapping):
            for sub in _stat_layers(node[STATS]):
                layers[(*path, *sub)] = (
                    get_path(node[STATS], sub),
                    get_path(node.get(PARAMS), sub, {}),
                    get_path(node[STATS], sub),
                )
            skip = (STATS, PARAMS, *_SKIP)
        elif _is_layer(node):
            layers[path] = (node, node, node)
            return
        else:
            skip = _SKIP
        for key, value in node.items():
            if key not in skip:
                visit(value, (*path, key))

    visit(tree, ())
    return layers


def _shape(value) -> tuple[int, ...]:
    return tuple(np.shape(value))


def _check(statistics, params, counters, expected_shape) -> tuple:
    """(shape, count, skipped, problems, notes) of one layer."""
    problems, notes = [], []
    for name in ("mean", "var"):
        if name not in statistics:
            problems.append(f"missing {name}")
    present = {n: statistics[n] for n in _STAT_NAMES if n in statistics}
    shape = _shape(present.get("mean", present.get("var"))) if present else None
    for name, value in present.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            problems.append(f"{name} has dtype {array.dtype}, not floating")
            continue
        if _shape(array) != shape:
            problems.append(f"{name} shape {_shape(array)} != {shape}")
        bad = int(np.sum(~np.isfinite(array)))
        if bad:
            problems.append(f"{name} non-finite in {bad} channel(s)")
        if name.endswith("var") and bad < array.size:
            negative = int(np.sum(array < 0))
            if negative:
                problems.append(
                    f"negative {name} in {negative} channel(s) (min {np.nanmin(array):.3g})"
                )
            zero = int(np.sum(array == 0))
            if zero:
                notes.append(f"{name} 0 in {zero} channel(s)")
    for name in ("scale", "bias"):
        value = params.get(name) if isinstance(params, Mapping) else None
        if value is not None and shape is not None and _shape(value) != shape:
            problems.append(f"{name} shape {_shape(value)} != statistics {shape}")
    if expected_shape is not None and shape is not None and shape != expected_shape:
        problems.append(f"shape {shape} != the model's {expected_shape}")
    count = counters.get("count") if isinstance(counters, Mapping) else None
    skipped = counters.get("skipped") if isinstance(counters, Mapping) else None
    count = None if count is None else int(np.asarray(count))
    skipped = None if skipped is None else int(np.asarray(skipped))
    moved = "mean" in present and "var" in present and not _initial(present)
    if count == 0 and moved:
        # Statistics set from outside (e.g. loaded) while the counters stayed at 0.
        notes.append("count 0 but the statistics moved from their initial values")
    elif count == 0:
        problems.append("never updated (count 0)")
    elif count is None and "mean" in present and "var" in present and _initial(present):
        problems.append("never updated? (mean 0, var 1 exactly: the initial values)")
    if skipped:
        notes.append(f"{skipped} non-finite batch(es) skipped")
    return shape, count, skipped, tuple(problems), tuple(notes)


def _initial(present) -> bool:
    mean, var = np.asarray(present["mean"]), np.asarray(present["var"])
    return mean.size > 0 and bool(np.all(mean == 0) and np.all(var == 1))


def validate_statistics(tree: Any, *, expected: Any = None) -> ValidationReport:
    """Checks every batch-norm layer's statistics in `tree`; see the module docstring.

    Args:
      tree: linen variables, a train state, a restored checkpoint, an nnx model or state, or
        any pytree of batch-norm states.
      expected: optionally the model's variables or their shapes, e.g.
        ``jax.eval_shape(model.init, key, x, train=False)``: layers it has and `tree` lacks
        are reported missing, and shapes must match it.

    Problems (``report.ok`` is False): missing mean/var, non-finite values, negative variance,
    count 0 (or, without counters, exactly the initial mean 0 / var 1), shapes that disagree
    (mean, var, scale, bias, the model), and no batch-norm statistics at all (unless the
    model has none: `expected` without batch norms, or a training state without
    'batch_stats'; then a note of the report says so). Notes (not failures): skipped
    non-finite batches, channels with variance exactly 0.

    Example:
      >>> ok = {"batch_stats": {"bn": {"mean": np.ones(2), "var": np.ones(2)}}}
      >>> validate_statistics(ok).ok
      True
      >>> bad = {"batch_stats": {"bn": {"mean": np.ones(2), "var": np.array([1.0, -1.0])}}}
      >>> validate_statistics(bad).layers[0].problems
      ('negative var in 1 channel(s) (min -1)',)
    """
    plain = _plain(tree)
    found = _find(plain)
    want = {}
    if expected is not None:
        want = {
            p: _shape(s[0].get("mean", s[0].get("var"))) for p, s in _find(_plain(expected)).items()
        }
    reports, problems, notes = [], [], []
    for path, (statistics, params, counters) in found.items():
        shape, count, skipped, layer_problems, notes = _check(
            statistics, params, counters, want.get(path)
        )
        if want and path not in want:
            notes = (*notes, "not in the model")
        reports.append(LayerReport(path_str(path), shape, count, skipped, layer_problems, notes))
    for path, shape in want.items():
        if path not in found:
            reports.append(LayerReport(path_str(path), shape, None, None, ("missing",)))
    if not reports and expected is not None:
        notes.append("no batch-norm statistics to check: the model has no batch norm")
    elif not reports and _training_state_without_statistics(plain):
        notes.append(
            "no batch-norm statistics to check: a training state without 'batch_stats' (its "
            "model has no batch norm, e.g. norm='group')"
        )
    elif not reports:
        problems.append(
            "no batch-norm statistics found (a checkpoint of the params alone? save the whole "
            "variables dict, 'batch_stats' included)"
        )
    return ValidationReport(reports, problems, notes)


def _training_state_without_statistics(tree) -> bool:
    """Whether `tree` is a training state ('params' beside 'opt_state') with no 'batch_stats':
    a training state keeps the model's whole state, so its model has no running statistics."""
    return (
        isinstance(tree, Mapping)
        and isinstance(tree.get(PARAMS), Mapping)
        and "opt_state" in tree
        and STATS not in tree
    )
