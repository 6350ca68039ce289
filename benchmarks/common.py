"""Helpers the benchmarks share: HLO kernel counts, table formatting, package versions.

The benchmark scripts run as ``python benchmarks/<name>.py``, so this sibling module is on
their import path.
"""

from __future__ import annotations

import importlib.metadata


def fusion_count(hlo: str) -> int:
    """Number of kernels launched by the entry computation (fusions plus unfused ops)."""
    lines = hlo.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    except StopIteration:
        return 0
    count = 0
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        if " fusion(" in line or "custom-call(" in line or " reduce(" in line:
            count += 1
    return count


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "n/a (flax 0)" if a else "n/a (both 0)"
    return f"{a / b:.2f}x"


def fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def abort_if_disagreeing(failures: list[str], what: str) -> None:
    """Stops the benchmark when bnjax and its reference computed different numbers (`what`
    names the comparison): timing them would compare different computations."""
    if failures:
        raise SystemExit(
            f"ABORT: {what} disagree, so timing them would compare different computations:\n  "
            + "\n  ".join(failures)
        )


def emit_report(lines: list[str], out: str | None) -> None:
    """Prints the Markdown report, and writes it to `out` when given (for the README)."""
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text)
        print(f"wrote {out}")
