"""Check a serving artifact from its files alone: ``verify(path)`` and its four checks.

0. **integrity**: the manifest equals its own checksum, and every file it names (the program,
   the calibration arrays, the statistics) equals the SHA-256 recorded at export. An edited
   manifest (a loosened tolerance, another program file), a swapped program or a cut
   calibration batch fails here. Every name is confined to the artifact's directory
   (`bnjax.export.artifact.member`): a name that leaves it makes the artifact unreadable.
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
   depends on the other examples of the batch. It needs at least 2 calibration examples.

The tolerance a verification accepts does not come from the file it verifies: the manifest's
``rtol`` is used only up to a ceiling held in code, `DEFAULT_RTOL`, unless the caller passes a
looser ``rtol`` to `verify` explicitly (as `export` does for the ``rtol`` it was given). An
error within float32 rounding of the output scale (`FLOAT32_ROUNDING`) that still exceeds a
smaller ``rtol`` is reported as a tolerance below float32 precision, not as a fault.

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

__all__ = [
    "DEFAULT_RTOL",
    "FLOAT32_ROUNDING",
    "Check",
    "VerificationError",
    "VerificationReport",
    "verify",
]

DEFAULT_RTOL = 1e-4
"""Outputs must match within this fraction of their scale (justified in the module docstring);
also the ceiling on the tolerance a manifest may state."""

FLOAT32_ROUNDING = 1e-6
"""An error up to this fraction of the output scale is float32 rounding (eps32 = 1.2e-7, a few
reassociated products): a tolerance below it fails exact programs."""


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


def _check_integrity(directory: str, manifest: dict, names: list[str]) -> Check:
    """The manifest's own checksum and the SHA-256 of each file in `names` (all it names)."""
    stated = manifest.get(A.CHECKSUM)
    files = manifest.get(A.FILES)
    if not isinstance(stated, str) or not isinstance(files, dict):
        return Check(
            "integrity",
            False,
            "the manifest has no checksum (written by an older bnjax, or removed): nothing "
            "vouches for its files; re-export the model",
        )
    problems = []
    if A.manifest_digest(manifest) != stated:
        problems.append(f"{A.MANIFEST} changed since export")
    for name in names:
        path = A.member(directory, name)
        if name not in files:
            problems.append(f"{name} is not covered by a checksum")
        elif not os.path.isfile(path):
            problems.append(f"{name} missing")
        elif A.file_digest(path) != files[name]:
            problems.append(f"{name} changed since export")
    if problems:
        return Check("integrity", False, "; ".join(problems))
    return Check("integrity", True, f"manifest and {len(names)} file(s) match their checksums")


def _within(name: str, error: float, atol: float, rtol: float, scale: float, what: str) -> Check:
    relative = error / scale if scale > 0 else float("inf") if error else 0.0
    measured = f"max |{what}| = {error:.3g}, {relative:.2g} of output scale {scale:.3g}"
    detail = f"{measured} (rtol {rtol:g})"
    ok = bool(error <= atol)
    if not ok and relative <= FLOAT32_ROUNDING:
        detail += (
            f"; that is float32 rounding: rtol {rtol:g} is below float32 precision (use rtol "
            f">= {FLOAT32_ROUNDING:g}; the default is {DEFAULT_RTOL:g})"
        )
    return Check(name, ok, detail)


def _tolerance(stated, ceiling) -> tuple[float, str]:
    """(rtol, note): the manifest's `stated` rtol, held to `ceiling`."""
    if not (isinstance(stated, (int, float)) and 0 < stated < 1):
        return ceiling, f"; the manifest states rtol {stated!r}, not a fraction in (0, 1)"
    if stated > ceiling:
        return ceiling, (
            f"; the manifest states rtol {stated:g}, above the ceiling {ceiling:g} (pass "
            f"rtol={stated:g} to verify to accept it)"
        )
    return float(stated), ""


def verify(path: str, *, rtol: float | None = None) -> VerificationReport:
    """Runs the checks of the module docstring on the artifact directory `path`.

    Args:
      path: the artifact directory.
      rtol: the loosest tolerance to accept (default `DEFAULT_RTOL`). The manifest's own
        ``rtol`` applies when it is tighter; a looser one stated in the manifest is held to
        this ceiling, so editing the file cannot loosen its own check.

    Raises `ArtifactError` (``python -m bnjax.export verify`` exits 2) when the artifact
    cannot be read (no manifest, missing files, a file name outside the artifact, a program
    that does not load); a failed check is in the report instead (exit 1).

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
    ceiling = DEFAULT_RTOL if rtol is None else rtol
    if not (isinstance(ceiling, (int, float)) and 0 < ceiling < 1):
        raise ValueError(f"`rtol` is {rtol!r}; it must be a fraction in (0, 1), e.g. 1e-4.")
    manifest = A.read_manifest(path)
    program = manifest["program"]
    calibration = manifest["calibration"]
    if not isinstance(program, dict) or program.get("format") not in FORMATS:
        found = program.get("format") if isinstance(program, dict) else program
        raise A.ArtifactError(f"unknown program format {found!r}.")
    if not isinstance(calibration, dict):
        raise A.ArtifactError(f"the manifest's calibration is {calibration!r}, not a mapping.")
    names = [
        program.get("file"),
        calibration.get("inputs", A.INPUTS),
        calibration.get("outputs", A.OUTPUTS),
        A.STATISTICS,
    ]
    for name in names:  # before anything is read: no file outside the artifact
        A.member(path, name)
    checks = [_check_integrity(path, manifest, names), _check_statistics(path, manifest)]
    inputs = A.read_array(path, names[1])
    reference = A.read_array(path, names[2]).astype(np.float64)
    try:
        run = FORMATS[program["format"]].load(A.member(path, names[0]))
    except ImportError:
        raise
    except Exception as error:
        raise A.ArtifactError(f"program {program.get('file')!r} does not load: {error}") from None
    rtol, note = _tolerance(calibration.get("rtol"), ceiling)
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
    error = float(np.max(np.abs(outputs - reference))) if outputs.size else 0.0
    check = _within("outputs", error, atol, rtol, scale, "artifact - model")
    checks.append(check._replace(detail=check.detail + note))
    if len(inputs) < 2:
        checks.append(
            Check(
                "batch independence",
                False,
                f"the calibration batch has {len(inputs)} example(s); comparing each example "
                f"alone and in its batch needs at least 2 (re-export with a larger batch)",
            )
        )
        return VerificationReport(checks)
    try:
        alone = np.concatenate([run(inputs[i : i + 1]) for i in range(len(inputs))])
    except Exception as error:
        checks.append(Check("batch independence", False, f"fails on a batch of one: {error}"))
        return VerificationReport(checks)
    error = float(np.max(np.abs(alone.astype(np.float64) - outputs)))
    check = _within("batch independence", error, atol, rtol, scale, "alone - in batch")
    if not check.ok and "float32 precision" not in check.detail:
        check = check._replace(
            detail=check.detail + "; an example's output depends on the rest of its batch: "
            "batch statistics in the program (exported in training mode?)"
        )
    checks.append(check._replace(detail=check.detail + note))
    return VerificationReport(checks)
