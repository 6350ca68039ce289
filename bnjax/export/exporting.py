"""Write a verified serving artifact: `export` (a folded model) and `export_function` (any).

`export` takes a `bnjax.lifecycle.FoldedModel` (``fold_model(model, variables, x,
train=False)`` for linen, ``fold_model(model, x)`` for nnx): the program is the folded model,
its reference the unfolded model in evaluation mode, and the manifest records the fold and
every batch norm's statistics. `export_function` exports any function of one array (the
reference defaults to the function itself). Either way the artifact is written to a temporary
directory, checked with `bnjax.export.verify`, and moved to `out` only when every check passes;
otherwise `VerificationError` says which check failed and nothing is left at `out`.

``overwrite=True`` replaces only a serving artifact (a directory with a manifest of ours and
no file that is not part of it, `bnjax.export.artifact.check_replaceable`); anything else at
`out` (a run's workdir, a folder holding an artifact among other files, a file) raises
FileExistsError and is left untouched. The old artifact is moved aside, the new one moved in,
and only then is the old one deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from bnjax.export import artifact as A
from bnjax.export.formats import FORMATS, PLATFORMS
from bnjax.export.verify import DEFAULT_RTOL, VerificationError, VerificationReport, verify
from bnjax.lifecycle import layers as L

__all__ = ["DEFAULT_RTOL", "export", "export_function"]


def _calibration_batch(calibration) -> np.ndarray:
    batch = np.asarray(calibration)
    if batch.ndim < 1 or batch.shape[0] < 2:
        raise ValueError(
            f"`calibration` must be a batch of at least 2 real inputs (N, ...), got shape "
            f"{batch.shape}: batch independence compares each example alone and in the batch."
        )
    return batch


def export_function(
    fn: Callable,
    calibration,
    out: str,
    *,
    format: str = "stablehlo",
    reference: Callable | None = None,
    rtol: float = DEFAULT_RTOL,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    fold: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check: bool = True,
) -> VerificationReport:
    """Exports `fn` (one array (N, ...) -> one array (N, ...)) to the artifact directory `out`.

    Args:
      fn: the serving function; traced for any batch size.
      calibration: (N >= 2, ...) real inputs, stored with the reference outputs for `verify`.
      out: the artifact directory: must not exist, unless `overwrite` and it is an artifact.
      format: 'stablehlo' or 'onnx' (`bnjax.export.formats.FORMATS`).
      reference: what the outputs must equal (default `fn`): the model in evaluation mode.
      rtol: tolerance as a fraction of ``max |reference outputs|``; recorded in the manifest
        (a later `verify` accepts one above `DEFAULT_RTOL` only when passed it explicitly).
      statistics: {norm path: {'mean', 'var'}} recorded and checked; fold: the fold report.
      source: provenance for the manifest (e.g. {'workdir': ..., 'step': ...}).
      check: verify before moving the artifact to `out` (raise `VerificationError` on failure).

    Returns the `VerificationReport` (empty when not `check`).

    Example:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "double")
      >>> print(export_function(lambda x: 2 * x, np.ones((3, 2), np.float32), path))
      ok    integrity: manifest and 4 file(s) match their checksums
      ok    statistics: 0 batch norm(s): present, finite, checksums
      ok    outputs: max |artifact - model| = 0, 0 of output scale 2 (rtol 0.0001)
      ok    batch independence: max |alone - in batch| = 0, 0 of output scale 2 (rtol 0.0001)
      verified: all 4 check(s) passed
    """
    if format not in FORMATS:
        raise ValueError(f"`format` is {format!r}; expected one of {sorted(FORMATS)}.")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"`rtol` is {rtol!r}; it must be a fraction in (0, 1), e.g. 1e-4.")
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(
                f"`out` {out!r} exists; choose another path or pass overwrite=True."
            )
        A.check_replaceable(out)
    batch = _calibration_batch(calibration)
    expected = jax.jit(reference or fn)(batch)
    if not isinstance(expected, jax.Array | np.ndarray):
        raise TypeError(
            f"the model returns {type(expected).__name__}; an artifact serves one array "
            f"(wrap the model to return the logits)."
        )
    expected = np.asarray(expected)
    if expected.ndim < 1 or expected.shape[0] != batch.shape[0]:
        raise ValueError(f"the output {expected.shape} has no batch axis of {batch.shape[0]}.")
    scale = float(np.max(np.abs(expected.astype(np.float64))))
    partial = f"{out}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(partial)
    try:
        program = FORMATS[format].write(fn, batch.shape, batch.dtype, partial)
        np.save(os.path.join(partial, A.INPUTS), batch)
        np.save(os.path.join(partial, A.OUTPUTS), expected)
        manifest = {
            "program": {
                "format": format,
                "file": program,
                "platforms": list(PLATFORMS) if format == "stablehlo" else ["onnxruntime"],
            },
            "input": A.array_spec(batch.shape, batch.dtype),
            "output": A.array_spec(expected.shape, expected.dtype),
            "statistics": A.write_statistics(partial, statistics or {}),
            "fold": dict(fold or {}),
            "calibration": {
                "inputs": A.INPUTS,
                "outputs": A.OUTPUTS,
                "examples": int(batch.shape[0]),
                "rtol": float(rtol),
                "scale": scale,
                "atol": float(rtol) * scale,
            },
            "versions": A.versions(*FORMATS[format].packages),
            "source": dict(source or {}),
        }
        A.write_manifest(partial, manifest)
        report = verify(partial, rtol=float(rtol)) if check else VerificationReport([])
        if not report.ok:
            raise VerificationError(report)
        _move_into_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report


def _move_into_place(partial: str, out: str) -> None:
    """Moves the verified `partial` to `out`, replacing the artifact there (checked again
    here: it may have changed while the new one was written)."""
    if not os.path.lexists(out):
        os.replace(partial, out)
        return
    A.check_replaceable(out)
    old = f"{out}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError:
        os.replace(old, out)  # the old artifact back where it was
        raise
    shutil.rmtree(old)


def export(folded, calibration, out: str, **options) -> VerificationReport:
    """Exports a `bnjax.lifecycle.FoldedModel` (see `export_function` for `options`).

    The program is the folded model; its outputs must equal the unfolded model's in
    evaluation mode (``folded.evaluate``); the manifest records the fold (which norm went into
    which layer, which stay affine and why) and every norm's statistics.

    Example:
      >>> import tempfile
      >>> from bnjax import lifecycle, models
      >>> model = models.SmallCNN(features=(4,), num_classes=3)
      >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
      >>> variables = model.init(jax.random.key(1), x, train=False)
      >>> folded = lifecycle.fold_model(model, variables, x, train=False)
      >>> report = export(folded, x, os.path.join(tempfile.mkdtemp(), "cnn"))
      >>> report.ok, [check.name for check in report.checks]
      (True, ['integrity', 'statistics', 'outputs', 'batch independence'])
    """
    plan = folded.plan
    fold = {
        "folded": {L.path_str(n): L.path_str(layer) for n, layer in plan.pairs.items()},
        "affine": {L.path_str(n): reason for n, reason in plan.unfoldable.items()},
    }
    statistics = {L.path_str(path): stats for path, stats in folded.statistics.items()}
    return export_function(
        folded,
        calibration,
        out,
        reference=folded.evaluate,
        statistics=statistics,
        fold=fold,
        **options,
    )
