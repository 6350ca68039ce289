"""Check a serving artifact from its files alone: ``verify(path)`` and its three checks.

1. **statistics**: every batch norm the manifest lists has its running 'mean' and 'var' in
   statistics.npz, equal to the CRC32 recorded at export, finite, with var >= 0. A stripped,
   corrupted or NaN statistic fails here.
2. **outputs**: the reloaded program (``jax.export`` StableHLO, or ONNX under onnxruntime) on
   the calibration batch equals the outputs the in-memory evaluation-mode model gave at export:
   ``max |artifact - reference| <= rtol * scale`` with ``scale = max |reference|``. A wrong
   fold, a tampered program or a converter bug fails here.
3. **batch independence**: each calibration example's output in the full batch equals its
   output in a batch of one, to the same tolerance. A program that normalizes with batch
   statistics (a model exported in training mode) fails here: its output for an example
   depends on the other examples of the batch.

The tolerance: folding reassociates float32 products, ``(x . W) * g`` becomes ``x . (W * g)``,
so each output moves by about ``sqrt(K) * eps32 * |terms|`` per layer (K the terms of a dot
product, eps32 = 1.2e-7): measured at 8.5e-7 of the output scale on ResNet-20 (StableHLO and
ONNX alike). The default ``rtol = 1e-4`` leaves two orders of magnitude of margin, while one
output channel 5% off already moves outputs by 3e-3 of the scale.

Example:
  >>> report = VerificationReport([Check("outputs", True, "max error 0")])
  >>> report.ok, report.format()
  (True, 'ok    outputs: max error 0\\nverified: all 1 check(s) passed')
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np

from bnjax.export import artifact as A
from bnjax.export.formats import FORMATS

__all__ = ["Check", "VerificationError", "VerificationReport", "verify"]


class Check(NamedTuple):
    """One check of `verify`: its name, whether it passed, and what was measured.

    Example:
      >>> Check("statistics", False, "bn: var non-finite in 1").ok
      False
    """

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class VerificationReport:
    """The checks of an artifact; ``ok`` when all passed. ``format()`` is one line per check.

    Example:
      >>> report = VerificationReport([Check("statistics", True, "1 batch norm(s)"),
      ...                              Check("outputs", False, "max error 0.5")])
      >>> report.ok, report.format().splitlines()[-1]
      (False, 'FAILED: outputs')
    """

    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def format(self) -> str:
        lines = [f"{'ok' if c.ok else 'FAIL':5} {c.name}: {c.detail}" for c in self.checks]
        failed = [c.name for c in self.checks if not c.ok]
        lines.append(
            f"FAILED: {', '.join(failed)}"
            if failed
            else f"verified: all {len(self.checks)} check(s) passed"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class VerificationError(ValueError):
    """An export whose artifact failed verification (nothing was written); ``.report``.

    Example:
      >>> error = VerificationError(VerificationReport([Check("outputs", False, "off")]))
      >>> error.report.ok, str(error).splitlines()[-1]
      (False, 'FAILED: outputs')
    """

    def __init__(self, report: VerificationReport):
        super().__init__(
            "the exported program does not match the model in evaluation mode, so nothing "
            "was written:\n" + report.format()
        )
        self.report = report


def _check_statistics(directory: str, manifest: dict) -> Check:
    entries = manifest["statistics"]
    stored = A.read_statistics(directory)
    problems = []
    for path, stats in entries.items():
        for name in A.STAT_NAMES:
            key, entry = f"{path}/{name}", stats.get(name)
            if key not in stored or entry is None:
                problems.append(f"{path}: running {name} missing (stripped statistics)")
                continue
            value = stored[key]
            if not np.all(np.isfinite(value)):
                problems.append(f"{path}: {name} non-finite in {int(np.sum(~np.isfinite(value)))}")
            elif name == "var" and np.any(value < 0):
                problems.append(f"{path}: negative var in {int(np.sum(value < 0))} channel(s)")
            if A.crc32(value) != entry.get("crc32"):
                problems.append(f"{path}: {name} differs from its checksum at export")
    folded = manifest.get("fold", {})
    norms = [*folded.get("folded", {}), *folded.get("affine", {})]
    problems += [f"{path}: no statistics recorded" for path in norms if path not in entries]
    if problems:
        more = f"; ... {len(problems) - 6} more" if problems[6:] else ""
        shown = "; ".join(problems[:6]) + more
        return Check("statistics", False, shown)
    return Check("statistics", True, f"{len(entries)} batch norm(s): present, finite, checksums")


def _within(name: str, error: float, atol: float, rtol: float, scale: float, what: str) -> Check:
    relative = error / scale if scale > 0 else float("inf") if error else 0.0
    measured = f"max |{what}| = {error:.3g}, {relative:.2g} of output scale {scale:.3g}"
    detail = f"{measured} (rtol {rtol:g})"
    return Check(name, bool(error <= atol), detail)


def verify(path: str) -> VerificationReport:
    """Runs the checks of the module docstring on the artifact directory `path`.

    Raises `ArtifactError` (``python -m bnjax.export verify`` exits 2) when the artifact
    cannot be read (no manifest, missing files, a program that does not load); a failed check
    is in the report instead (exit 1).

    Example:
      >>> import tempfile
      >>> from bnjax import lifecycle, models
      >>> from bnjax.export import export
      >>> model, x = models.MLP(features=(4,), num_classes=2), jnp.ones((4, 3))
      >>> folded = lifecycle.fold_model(model, model.init(jax.random.key(0), x, train=False),
      ...                               x, train=False)
      >>> path = os.path.join(tempfile.mkdtemp(), "mlp")
      >>> _ = export(folded, x, path)
      >>> verify(path).ok
      True
    """
    manifest = A.read_manifest(path)
    program = manifest["program"]
    if program.get("format") not in FORMATS:
        raise A.ArtifactError(f"unknown program format {program.get('format')!r}.")
    checks = [_check_statistics(path, manifest)]
    calibration = manifest["calibration"]
    inputs = A.read_array(path, calibration.get("inputs", A.INPUTS))
    reference = A.read_array(path, calibration.get("outputs", A.OUTPUTS)).astype(np.float64)
    try:
        run = FORMATS[program["format"]].load(os.path.join(path, program["file"]))
    except ImportError:
        raise
    except Exception as error:
        raise A.ArtifactError(f"program {program.get('file')!r} does not load: {error}") from None
    rtol = float(calibration["rtol"])
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    atol = rtol * scale
    try:
        outputs = run(inputs).astype(np.float64)
    except Exception as error:
        checks.append(Check("outputs", False, f"the program fails on the calibration: {error}"))
        return VerificationReport(checks)
    if outputs.shape != reference.shape:
        checks.append(
            Check("outputs", False, f"shape {outputs.shape}, reference {reference.shape}")
        )
        return VerificationReport(checks)
    error = float(np.max(np.abs(outputs - reference)))
    checks.append(_within("outputs", error, atol, rtol, scale, "artifact - model"))
    try:
        alone = np.concatenate([run(inputs[i : i + 1]) for i in range(len(inputs))])
    except Exception as error:
        checks.append(Check("batch independence", False, f"fails on a batch of one: {error}"))
        return VerificationReport(checks)
    error = float(np.max(np.abs(alone.astype(np.float64) - outputs)))
    check = _within("batch independence", error, atol, rtol, scale, "alone - in batch")
    if not check.ok:
        check = check._replace(
            detail=check.detail + "; an example's output depends on the rest of its batch: "
            "batch statistics in the program (exported in training mode?)"
        )
    checks.append(check)
    return VerificationReport(checks)
