"""Serving: a trained model to a verified artifact with batch norm folded and in evaluation mode.

    folded = bnjax.lifecycle.fold_model(model, variables, x, train=False)   # nnx: (model, x)
    bnjax.export.export(folded, calibration_batch, "artifacts/resnet20", format="stablehlo")
    bnjax.export.verify("artifacts/resnet20").ok                       # from the files alone

    $ python -m bnjax.export --workdir=runs/resnet20 --format=onnx --out=artifacts/r20
    $ python -m bnjax.export verify artifacts/r20          # exit 0 ok, 1 failed, 2 unreadable

- `export` / `export_function` (`bnjax.export.exporting`): write the program (``jax.export``
  StableHLO, or ONNX through jax2onnx), the calibration batch with the in-memory model's
  outputs, every running statistic and a manifest; verify; move into place only if it passes.
- `verify` (`bnjax.export.verify`): the manifest and its files unchanged since export (checksums);
  statistics present, finite and unchanged; the reloaded program equals the evaluation-mode
  model within the stated tolerance (held to a ceiling in code); batch independence.
- `load` runs an artifact's program without the model code. Rebuilding a ``scripts/train.py``
  run's model from its workdir is the training application's (`bnjax.train.load_workdir`),
  which ``python -m bnjax.export --workdir=...`` uses.
- The artifact layout and manifest: `bnjax.export.artifact`; formats: `bnjax.export.formats`.
"""

from bnjax.export.artifact import MANIFEST_FORMAT, ArtifactError, member, read_manifest
from bnjax.export.exporting import DEFAULT_RTOL, export, export_function
from bnjax.export.formats import FORMATS
from bnjax.export.verify import Check, VerificationError, VerificationReport, verify


def load(path: str):
    """The program of the artifact at `path` as a function of a numpy batch (no model code).

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "double")
      >>> _ = export_function(lambda x: 2 * x, np.ones((3, 2), np.float32), path)
      >>> load(path)(np.ones((1, 2), np.float32)).tolist()
      [[2.0, 2.0]]
    """
    program = read_manifest(path)["program"]
    if not isinstance(program, dict) or program.get("format") not in FORMATS:
        found = program.get("format") if isinstance(program, dict) else program
        raise ArtifactError(f"unknown program format {found!r}.")
    return FORMATS[program["format"]].load(member(path, program.get("file")))


__all__ = [
    "DEFAULT_RTOL",
    "FORMATS",
    "MANIFEST_FORMAT",
    "ArtifactError",
    "Check",
    "VerificationError",
    "VerificationReport",
    "export",
    "export_function",
    "load",
    "read_manifest",
    "verify",
]
