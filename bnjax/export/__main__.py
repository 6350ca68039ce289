"""Command line: export a training run for serving, or verify an artifact.

    python -m bnjax.export --workdir=WD --format=stablehlo|onnx --out=PATH [--step=N]
        [--examples=16] [--rtol=1e-4] [--overwrite] [--averaged]
    python -m bnjax.export verify ARTIFACT [--rtol=R]

Export rebuilds the run's model from ``WD/config.json``, restores the newest readable (or the
``--step``) checkpoint, folds every batch norm it can (`bnjax.lifecycle.fold_model`; a model
without batch norm is exported as it is), writes the artifact and verifies it on
``--examples`` held-out inputs of the run's dataset; the fold report and the checks are
printed. ``--averaged`` exports the run's averaged model instead (``config.ema_decay > 0``,
with its averaged batch statistics). A newest checkpoint that does not restore (truncated
files, a missing checksum manifest) is passed over with a ``note:`` line, as a resumed
training run does; an unreadable ``--step`` is an error. ``--out`` must not be the workdir, a
directory above it, or an existing path inside it, and ``--overwrite`` replaces only an
existing serving artifact.

Verify runs the checks of `bnjax.export.verify` from the artifact's files; ``--rtol`` raises
the tolerance ceiling (default `bnjax.export.DEFAULT_RTOL`) for an artifact exported with a
looser one.

Exit status: 0 exported / verified; 1 verification failed (nothing is written by export);
2 usage error, or the workdir, checkpoint or artifact cannot be read (or its statistics cannot
be folded: NaN, negative variance, stripped), or ``--out`` is refused.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

from absl import app, flags

from bnjax.train.cli import RUN_FAILED, USAGE_ERROR, fail, parse_flags


def _define_flags():
    """The export flags, defined when the module runs as a program (importing it, as the
    documentation checks do, must not claim flag names such as --workdir)."""
    return {
        "workdir": flags.DEFINE_string("workdir", None, "a scripts/train.py workdir to export"),
        "format": flags.DEFINE_enum("format", "stablehlo", ["stablehlo", "onnx"], "format"),
        "out": flags.DEFINE_string("out", None, "the artifact directory to write"),
        "step": flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)"),
        "examples": flags.DEFINE_integer("examples", 16, "held-out inputs to calibrate on"),
        "rtol": flags.DEFINE_float("rtol", 1e-4, "tolerance, a fraction of the output scale"),
        "overwrite": flags.DEFINE_bool("overwrite", False, "replace an existing --out"),
        "averaged": flags.DEFINE_bool(
            "averaged", False, "export the run's averaged (EMA) model (config.ema_decay > 0)"
        ),
    }


def _verify(path: str, rtol: float | None = None) -> int:
    from bnjax.export import ArtifactError, verify

    try:
        report = verify(path, rtol=rtol)
    except (ArtifactError, ImportError) as error:
        fail(f"cannot read artifact {path!r}: {error}")
    except ValueError as error:
        fail(f"--rtol: {error}")
    print(f"artifact {path}")
    print(report.format())
    return 0 if report.ok else RUN_FAILED


def _check_out(workdir: str, out: str) -> None:
    """Refuses an `out` that would put the workdir being exported at risk (exit 2)."""
    run, target = os.path.realpath(workdir), os.path.realpath(out)
    shared = os.path.commonpath([run, target])
    if shared == target:
        fail(
            f"--out={out} is the workdir being exported or a directory above it; export "
            f"never replaces a workdir: write the artifact elsewhere (e.g. --out={run}-serving)."
        )
    if shared == run and os.path.lexists(out):
        fail(
            f"--out={out} exists inside the workdir being exported; export never replaces "
            f"anything in a workdir: choose a new --out."
        )


def export_command(value: dict) -> int:
    """The export command for flag `value`s {workdir, out, format, step, examples, rtol,
    overwrite, averaged (optional)}: prints the fold report and the checks; returns (or exits
    with) the status."""
    workdir, out = value["workdir"], value["out"]
    if not workdir or not out:
        fail("export needs --workdir and --out (or: python -m bnjax.export verify ARTIFACT).")
    if value["examples"] < 2:
        fail(f"--examples={value['examples']}: batch independence needs at least 2.")
    _check_out(workdir, out)
    from bnjax import lifecycle
    from bnjax.checkpoints import CheckpointWarning, root_cause
    from bnjax.export import VerificationError, export
    from bnjax.train.trained_run import load_workdir

    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", CheckpointWarning)
            try:
                run = load_workdir(
                    workdir,
                    step=value["step"],
                    examples=value["examples"],
                    averaged=value.get("averaged", False),
                )
            finally:
                for note in notes:
                    print(f"note: {' '.join(str(note.message).split())}", file=sys.stderr)
        folded = lifecycle.fold_model(run.model, run.variables, run.calibration, train=False)
        print(f"step {run.step} of {workdir}: {run.config.get('model')}")
        print(folded.plan.format())
        report = export(
            folded,
            run.calibration,
            out,
            format=value["format"],
            rtol=value["rtol"],
            overwrite=value["overwrite"],
            source={"workdir": workdir, "step": run.step, "model": run.config.get("model")},
        )
    except VerificationError as error:
        print(error.report.format())
        print(f"FAILED: nothing written to {out}", file=sys.stderr)
        return RUN_FAILED
    except (OSError, ValueError, TypeError, ImportError) as error:
        fail(root_cause(error))
    print(report.format())
    print(f"wrote {out} ({value['format']})")
    return 0


def main(argv, flag) -> int:
    """``python -m bnjax.export``: see the module docstring for commands and exit status."""
    commands = argv[1:]
    if commands[:1] == ["verify"]:
        if len(commands) != 2:
            fail("usage: python -m bnjax.export verify ARTIFACT", USAGE_ERROR)
        rtol = flag["rtol"].value if flag["rtol"].present else None
        return _verify(commands[1], rtol)
    if commands:
        fail(f"unexpected arguments {commands}; the command is 'verify ARTIFACT' or flags only.")
    return export_command({name: holder.value for name, holder in flag.items()})


if __name__ == "__main__":
    defined = _define_flags()
    # `verify ARTIFACT` is a subcommand: main checks the arguments itself.
    app.run(
        lambda argv: sys.exit(main(argv, defined)),
        flags_parser=functools.partial(parse_flags, allow_arguments=True),
    )
