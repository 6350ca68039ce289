"""The test-time adaptation table: ``python scripts/adaptation_table.py --out=docs/adaptation``.

Trains the source models, serves their shifted test splits as streams and writes OUT/results.csv
(one row per dataset, shift, order, batch size, method and seed), OUT/table.md (mean and 95%
t-interval over seeds, the best method of each row in bold) and OUT/against_source.md (each
method minus the source model, per order and batch size). ``--quick`` runs a small grid (one
data set, two seeds, about a minute). The settings are `bnjax.study.adaptation.Settings`.
"""

import time
from pathlib import Path

from absl import app, flags

from bnjax.study import adaptation

_OUT = flags.DEFINE_string("out", "docs/adaptation", "where results.csv and the tables go")
_QUICK = flags.DEFINE_bool("quick", False, "a small grid (digits, 2 seeds, B = 16)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = adaptation.QUICK if _QUICK.value else adaptation.Settings()
    out = Path(_OUT.value)
    start = time.time()
    rows = adaptation.run_table(settings, progress=lambda line: print(line, flush=True))
    adaptation.write_csv(rows, out / "results.csv")
    header = (
        f"Accuracy on the shifted test stream: mean ± half-width of the 95% t-interval over "
        f"{settings.seeds} seeds (`python scripts/adaptation_table.py"
        f"{' --quick' if _QUICK.value else ''}`, {time.time() - start:.0f} s on this machine; "
        f"settings in `bnjax.study.adaptation`). Bold: the best mean of the row.\n\n"
    )
    (out / "table.md").write_text(header + adaptation.markdown_table(rows))
    (out / "against_source.md").write_text(
        "Mean accuracy minus the source model's, over data sets and shifts; in brackets the "
        "cells where the method is below the source model by more than its own interval.\n\n"
        + adaptation.against_source(rows)
    )
    print(f"wrote {out}/results.csv, table.md, against_source.md in {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
