"""Command line: ``python -m bnjax.lifecycle validate CHECKPOINT_DIR [--step N] [--quiet]``.

Prints a per-layer table of the batch-norm statistics found in the checkpoint and exits with
0 when they are all sound, 1 when something is wrong (see `validate_statistics`), 2 when the
path cannot be read as a checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """``python -m bnjax.lifecycle validate PATH``: exit 0 ok, 1 problems, 2 unreadable."""
    parser = argparse.ArgumentParser(
        prog="python -m bnjax.lifecycle", description="Batch-norm lifecycle tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate",
        help="check a checkpoint's batch-norm statistics",
        description="Checks every batch-norm layer of a checkpoint for missing, non-finite, "
        "negative-variance, never-updated or wrong-shape statistics. Exit status: 0 ok, "
        "1 problems found, 2 unreadable checkpoint.",
    )
    validate.add_argument(
        "checkpoint", help="orbax checkpoint directory (a manager's root, a step, or an item), "
        "or a flax msgpack file",
    )  # fmt: skip
    validate.add_argument("--step", type=int, default=None, help="step of a manager's root")
    validate.add_argument(
        "--quiet", action="store_true", help="print only the failing layers and the summary"
    )
    args = parser.parse_args(argv)

    from bnjax.lifecycle.validation import load_checkpoint, validate_statistics

    try:
        tree = load_checkpoint(args.checkpoint, step=args.step)
    except Exception as error:  # any failure to read is exit status 2
        print(f"cannot read {args.checkpoint!r}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    report = validate_statistics(tree)
    print(report.format(only_problems=args.quiet))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
