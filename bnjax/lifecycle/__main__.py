"""Command line: ``python -m bnjax.lifecycle validate PATH [--step N] [--quiet]``.

PATH is a training workdir (its ``checkpoints/`` directory is read), a directory of
`bnjax.checkpoints.Checkpointer` steps, one of its steps or a step's ``state`` (or ``manifest``)
item, any other orbax checkpoint (a ``CheckpointManager``'s root, a step, a PyTree item), or
a flax msgpack file. The first line says what was read, e.g. ``step 600 of
/runs/a/checkpoints``; then comes a per-layer table of the batch-norm statistics and a summary
line (see `validate_statistics`). A model without batch norm (norm='group') has nothing to
check: OK, with a note saying so.

Checkpointer steps are read through ``Checkpointer.restore`` whichever of those paths names
them (see `bnjax.lifecycle.checkpoint_reading`), so every leaf is checked against the CRC32
written at save time: flipped bytes, truncated or missing files, and a missing manifest make
a step corrupt. Without ``--step`` the newest step is read. When it is corrupt, a line on
stderr says so (one per corrupt step), the newest readable step is validated and printed, and
the exit status is 2 whatever its statistics: the step that a resumed run or a server would
pick is broken. Other checkpoints carry no checksums: a ``note:`` line on stderr says their
bytes were not verified, and the statistics decide the exit status. Nothing is written:
corrupt steps are not moved.

Exit status: 0 the statistics are sound; 1 they have problems; 2 the checkpoint is unreadable
or corrupt (nothing readable, the requested step corrupt or without its manifest, or a step
newer than the one validated corrupt).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from bnjax.lifecycle.checkpoint_reading import _steps  # same package: one listing rule


def _note_unverified(load, *args):
    """`load(*args)`, its `UnverifiedCheckpointWarning` turned into one note on stderr."""
    from bnjax.lifecycle.checkpoint_reading import UnverifiedCheckpointWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedCheckpointWarning)
        tree = load(*args)
    for warning in caught:
        if issubclass(warning.category, UnverifiedCheckpointWarning):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return tree


def main(argv=None) -> int:
    """``python -m bnjax.lifecycle validate PATH``: exit 0 ok, 1 problems, 2 unreadable/corrupt."""
    parser = argparse.ArgumentParser(
        prog="python -m bnjax.lifecycle", description="Batch-norm lifecycle tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate",
        help="check a checkpoint's batch-norm statistics",
        description="Checks every batch-norm layer of a checkpoint for missing, non-finite, "
        "negative-variance, never-updated or wrong-shape statistics, and bnjax checkpoints "
        "against their checksums. Exit status: 0 ok, 1 problems found, 2 unreadable or "
        "corrupt checkpoint (also when the newest step is corrupt and an older one was "
        "validated).",
    )
    validate.add_argument(
        "checkpoint",
        help="a training workdir (reads WORKDIR/checkpoints), a checkpoints directory, a "
        "step or a step's state item (each checked against its checksums), another orbax "
        "checkpoint directory (a manager's root, a step, or an item), or a flax msgpack file",
    )
    validate.add_argument("--step", type=int, default=None, help="step of a manager's root")
    validate.add_argument(
        "--quiet", action="store_true", help="print only the failing layers and the summary"
    )
    args = parser.parse_args(argv)

    from bnjax.checkpoints import Checkpointer, CorruptCheckpointError, root_cause
    from bnjax.lifecycle.checkpoint_reading import (
        load_checkpoint,
        locate,
        read_checkpointer_step,
    )
    from bnjax.lifecycle.validation import validate_statistics

    def cannot_read(error: BaseException) -> int:
        print(f"cannot read {args.checkpoint!r}: {root_cause(error)}", file=sys.stderr)
        return 2

    try:
        path, step, managed = locate(args.checkpoint, args.step)
        if managed:  # a bnjax.checkpoints.Checkpointer's steps: each read through its checksums
            steps = Checkpointer(path, read_only=True).all_steps()
            load = lambda s: read_checkpointer_step(path, s)  # noqa: E731
        else:
            steps = _steps(path)
            load = lambda s: _note_unverified(load_checkpoint, path, s)  # noqa: E731
        if steps and step is not None and step not in steps:
            raise FileNotFoundError(f"No step {step} in {path!r}; steps: {steps}.")
        if not steps:
            tree, read, corrupt = _note_unverified(load_checkpoint, path, step), path, []
    except Exception as error:  # any failure to read is exit status 2
        return cannot_read(error)
    if steps:
        corrupt, tree = [], None
        for candidate in [step] if step is not None else steps[::-1]:
            try:
                tree = load(candidate)
            except CorruptCheckpointError as error:  # it names the step and why
                corrupt.append(candidate)
                print(error, file=sys.stderr)
                continue
            except Exception as error:
                corrupt.append(candidate)
                print(
                    f"step {candidate} of {path} is corrupt or unreadable: {root_cause(error)}",
                    file=sys.stderr,
                )
                continue
            read = f"step {candidate} of {path}"
            break
        if tree is None:
            if step is None:
                print(f"cannot read {args.checkpoint!r}: no readable step", file=sys.stderr)
            return 2
        if corrupt:
            read += f" (newest readable step; step(s) {corrupt[::-1]} corrupt)"
    print(read)
    report = validate_statistics(tree)
    print(report.format(only_problems=args.quiet))
    if corrupt:
        print(f"FAILED: step(s) {corrupt[::-1]} of {path} are corrupt", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
