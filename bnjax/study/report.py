"""The study's written results: `results.csv` (one row per run), `table.md` and `verdicts.md`.

Every cell of `table.md` is "mean [low, high]": the mean over seeds and its 95% bootstrap
interval (`bnjax.study.significance.bootstrap_ci`); "n/a" where a metric does not apply (no
running statistics), "(k/n)" where only k of n seeds gave a value (a probe target never
reached). In the accuracy tables a cell marked † does not differ significantly from batch
norm's in the same row (two-sided Welch, Holm-adjusted over that table, alpha 0.05); an
unmarked cell does. `table.md` starts with the definition of every column and its unit.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence

from bnjax.study import significance
from bnjax.study.claims import ALPHA, Verdict
from bnjax.train.workdir import write_atomically

# (column heading, results key, format, definition with unit) of the Table 1 layout; {deep} is
# the deepest layer.
TABLE1_COLUMNS = (
    (
        "stability excess, mean, layer 0",
        "stability_excess_mean_l0",
        ".4f",
        "variance over batches of layer 0's per-channel batch mean, in population variances, for "
        "the condition's batches minus for uniform batches of the same B (0 = no worse than "
        "i.i.d.; trained network, training mode)",
    ),
    (
        "stability excess, mean, layer {deep}",
        "stability_excess_mean_l{deep}",
        ".4f",
        "the same at the deepest normalized layer",
    ),
    (
        "stability, i.i.d., layer 0",
        "stability_iid_mean_l0",
        ".4f",
        "the i.i.d. baseline itself (about 1 / (B * H * W) for independent positions)",
    ),
    (
        "probe loss, final",
        "probe_loss_final",
        ".3f",
        "cross-entropy (nats) of the fixed held-out probe, evaluation mode, after training",
    ),
    (
        "probe loss, mean over run",
        "probe_loss_auc",
        ".3f",
        "mean probe loss over the run's probe points (nats; lower = faster convergence)",
    ),
    (
        "probe oscillation",
        "probe_oscillation",
        ".3f",
        "probe-loss total variation beyond its net descent, per probe interval (nats; 0 = "
        "monotone)",
    ),
    (
        "examples to probe target",
        "examples_to_target",
        ".0f",
        "training examples seen when the probe accuracy first reached the target",
    ),
    (
        "update noise (1 - cos)",
        "update_noise",
        ".3f",
        "training-time: mean 1 - cosine of consecutive weight updates (0 = same direction)",
    ),
    (
        "running mean bias",
        "running_mean_bias",
        ".3f",
        "mean over layers and channels of |running mean - population mean| / population std",
    ),
    (
        "running var bias",
        "running_var_bias",
        ".3f",
        "mean over layers and channels of |log(running std / population std)|",
    ),
    (
        "accuracy, eval mode",
        "accuracy_eval",
        ".3f",
        "test accuracy with the running statistics (what serving sees)",
    ),
    (
        "accuracy, batch stats, B=500",
        "accuracy_batch_stats",
        ".3f",
        "test accuracy, each test batch of 500 normalized with its own statistics",
    ),
    (
        "accuracy, batch stats, training B",
        "accuracy_batch_stats_train_b",
        ".3f",
        "the same with test batches of the run's training batch size",
    ),
    (
        "silhouette",
        "silhouette",
        ".3f",
        "silhouette of the penultimate test features by class (-1..1; higher = tighter, better "
        "separated clusters)",
    ),
)


# The columns of results.csv that hold text; every other column holds numbers (or is empty).
TEXT_COLUMNS = ("dataset", "family", "condition", "normalizer", "sampler", "groups")


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    """All rows, columns in first-seen order; a missing value or None is an empty cell. Written
    atomically (`bnjax.train.workdir.write_atomically`: write, fsync, rename): an interrupted
    write never leaves a truncated results.csv.

    Example:
      >>> import os, tempfile
      >>> rows = [{"seed": 0, "accuracy": 0.5}, {"seed": 1, "accuracy": None, "note": "nan loss"}]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "results.csv")
      ...     write_csv(rows, path)
      ...     with open(path) as f:
      ...         print(f.read(), end="")
      seed,accuracy,note
      0,0.5,
      1,,nan loss
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_atomically(path, buffer.getvalue())


def read_csv(
    path: str,
    *,
    text_columns: Sequence[str] = TEXT_COLUMNS,
    required: Sequence[str] = (),
    key: Callable[[dict], Hashable] | None = None,
) -> list[dict]:
    """`write_csv`'s rows back, validated: every row has every column of the header; a cell of
    one of `text_columns` is a string, any other cell an int if it reads as one, else a float
    ('nan' and 'inf' included); '' (an empty cell) is None. Blank lines are skipped.

    Raises ValueError naming the file, the line (as an editor counts them, header = 1) and the
    column for: a row with more or fewer cells than the header (a garbage line), text in a
    numeric column, a column of `required` missing from the header or empty in a row, and,
    with `key` (a row's identity, e.g. its run), a row whose key an earlier row already has.
    An exact copy is refused too: which row to keep is for the user to decide.

    Example:
      >>> import os, tempfile
      >>> rows = [{"seed": 0, "accuracy": 0.5}, {"seed": 1, "accuracy": None, "note": "nan loss"}]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "results.csv")
      ...     write_csv(rows, path)
      ...     back = read_csv(path, text_columns=("note",))
      ...     read_csv(path)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: .../results.csv, line 3, column 'note': 'nan loss' is not a number; ...
      >>> back[0]  # every row has every column
      {'seed': 0, 'accuracy': 0.5, 'note': None}
      >>> back[1]
      {'seed': 1, 'accuracy': None, 'note': 'nan loss'}
    """
    fix = "correct or delete that line"
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        for column in required:
            if column not in header:
                raise ValueError(f"{path}: no column {column!r} in the header (line 1).")
        text = set(text_columns)
        rows, first_line = [], {}
        start = reader.line_num + 1
        for cells in reader:
            # The record's first line (a quoted cell may span lines): where an editor finds it.
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(cells)} cells where the header has "
                    f"{len(header)}; {fix}."
                )
            row = {}
            for column, value in zip(header, cells, strict=True):
                row[column] = _parse(value, column in text)
                if row[column] is _NOT_A_NUMBER:
                    raise ValueError(
                        f"{path}, line {line}, column {column!r}: {value!r} is not a number; {fix}."
                    )
                if row[column] is None and column in required:
                    raise ValueError(
                        f"{path}, line {line}, column {column!r}: empty; every row needs it. "
                        f"{fix.capitalize()}."
                    )
            if key is not None:
                identity = key(row)
                if identity in first_line:
                    earlier = first_line[identity]
                    same = rows[earlier[1]] == row
                    raise ValueError(
                        f"{path}, line {line}: the run of line {earlier[0]} again ("
                        + ("an exact copy" if same else "with other values")
                        + "); delete one of the two lines."
                    )
                first_line[identity] = (line, len(rows))
            rows.append(row)
    return rows


_NOT_A_NUMBER = object()


def _parse(value: str, is_text: bool):
    if value == "":
        return None
    if is_text:
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return _NOT_A_NUMBER


def with_layer_means(rows: Sequence[Mapping]) -> list[dict]:
    """Rows with `running_mean_bias` and `running_var_bias`: the means over layers of the
    per-layer columns (None where the run has no running statistics).

    Example:
      >>> with_layer_means([{"running_mean_bias_l0": 0.1, "running_mean_bias_l1": 0.3,
      ...                    "running_var_bias_l0": None}])[0]["running_mean_bias"]
      0.2
    """
    out = []
    for row in rows:
        row = dict(row)
        for part in ("mean", "var"):
            values = [v for k, v in row.items() if k.startswith(f"running_{part}_bias_l")]
            values = [v for v in values if v is not None]
            row[f"running_{part}_bias"] = sum(values) / len(values) if values else None
        out.append(row)
    return out


def _select(rows, **where) -> list[Mapping]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def format_interval(interval: significance.Interval, fmt: str = ".3f", total: int = 0) -> str:
    """ "mean [low, high]", "n/a" without values, "(k/n)" appended when k < n = `total`.

    Example:
      >>> format_interval(significance.Interval(0.5, 0.41, 0.6, 5))
      '0.500 [0.410, 0.600]'
      >>> format_interval(significance.Interval(200.0, 150.0, 250.0, 2), ".0f", total=5)
      '200 [150, 250] (2/5)'
    """
    if interval.n == 0:
        return "n/a"
    text = f"{interval.mean:{fmt}} [{interval.low:{fmt}}, {interval.high:{fmt}}]"
    return text + (f" ({interval.n}/{total})" if total and interval.n < total else "")


def _cell(rows: Sequence[Mapping], key: str, fmt: str, resamples: int) -> str:
    values = [r.get(key) for r in rows]
    if not values:
        return "n/a"
    ci = significance.bootstrap_ci(values, resamples=resamples)
    return format_interval(ci, fmt, total=len(values))


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _ordered(rows, key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


def deepest_layer(rows: Sequence[Mapping]) -> int:
    """The highest layer index i with a `stability_excess_mean_l{i}` column.

    Example:
      >>> deepest_layer([{"stability_excess_mean_l0": 0.1, "stability_excess_mean_l2": 0.3}])
      2
    """
    prefix = "stability_excess_mean_l"
    return max(int(k[len(prefix) :]) for r in rows for k in r if k.startswith(prefix))


def accuracy_table(
    rows: Sequence[Mapping], labels: Mapping[str, str], key: str, resamples: int
) -> str:
    """Conditions x normalizers, `key` as mean [CI]; † = not significantly different from
    'batch' in the same row (two-sided Welch, Holm over the table's comparisons).

    Example:
      >>> rows = [{"condition": "u", "normalizer": n, "seed": s, "acc": v + 0.001 * s}
      ...         for s in range(5) for n, v in (("batch", 0.9), ("none", 0.5), ("group", 0.9))]
      >>> print(accuracy_table(rows, {"u": "uniform"}, "acc", 200))
      | condition | batch | none | group |
      |---|---|---|---|
      | uniform | 0.902 [0.901, 0.903] | 0.502 [0.501, 0.503] | 0.902 [0.901, 0.903] † |
    """
    conditions, normalizers = _ordered(rows, "condition"), _ordered(rows, "normalizer")
    tests = {}
    for c in conditions:
        base = [r.get(key) for r in _select(rows, condition=c, normalizer="batch")]
        for n in normalizers:
            if n != "batch" and base:
                other = [r.get(key) for r in _select(rows, condition=c, normalizer=n)]
                tests[(c, n)] = significance.welch(other, base)
    adjusted = dict(zip(tests, significance.holm(list(tests.values())), strict=True))
    body = []
    for c in conditions:
        cells = [labels.get(c, c)]
        for n in normalizers:
            cell = _cell(_select(rows, condition=c, normalizer=n), key, ".3f", resamples)
            p = adjusted.get((c, n))
            if p is not None and not p < ALPHA and cell != "n/a":
                cell += " †"
            cells.append(cell)
        body.append(cells)
    return _markdown(["condition", *normalizers], body)


def table1(rows: Sequence[Mapping], labels: Mapping[str, str], resamples: int) -> str:
    """The paper's Table 1 with numbers for the rows' normalizer: conditions x TABLE1_COLUMNS.

    Example:
      >>> rows = [{"condition": "u", "stability_excess_mean_l0": 0.01, "seed": s}
      ...         for s in range(2)]
      >>> table1(rows, {"u": "uniform"}, 100).splitlines()[2].split(" | ")[:2]
      ['| uniform', '0.0100 [0.0100, 0.0100]']
    """
    deep = deepest_layer(rows)
    header = ["condition"] + [h.format(deep=deep) for h, _, _, _ in TABLE1_COLUMNS]
    body = [
        [labels.get(c, c)]
        + [
            _cell(_select(rows, condition=c), key.format(deep=deep), fmt, resamples)
            for _, key, fmt, _ in TABLE1_COLUMNS
        ]
        for c in _ordered(rows, "condition")
    ]
    return _markdown(header, body)


def _sorted_values(rows, key) -> list:
    """The distinct values of `key`: numbers ascending, anything else in first-seen order."""
    values = _ordered(rows, key)
    if all(isinstance(v, (int, float)) for v in values):
        return sorted(values)
    return values


def _pivot(rows, row_key, column_key, key, fmt, resamples, row_label=str, column_label=str):
    rows_, columns = _sorted_values(rows, row_key), _sorted_values(rows, column_key)
    body = [
        [row_label(a)]
        + [
            _cell(_select(rows, **{row_key: a, column_key: b}), key, fmt, resamples)
            for b in columns
        ]
        for a in rows_
    ]
    return _markdown([row_key, *(column_label(b) for b in columns)], body)


def column_definitions() -> str:
    """The definitions of the Table 1 columns, as a markdown list.

    Example:
      >>> column_definitions().splitlines()[0][:40]
      '- **stability excess, mean, layer 0**: v'
    """
    lines = [f"- **{h.format(deep='L')}**: {d}." for h, _, _, d in TABLE1_COLUMNS]
    return "\n".join(lines)


def rates_table(rows: Sequence[Mapping], chosen: Mapping[tuple[str, str], float]) -> str:
    """The learning-rate sweep: validation accuracy (mean over its seeds) per dataset,
    normalizer and candidate rate; the chosen rate in bold.

    Example:
      >>> rows = [{"dataset": "d", "family": "lr", "normalizer": "batch", "learning_rate": r,
      ...          "validation_accuracy": a} for r, a in ((0.1, 0.9), (0.3, 0.8))]
      >>> rates_table(rows, {("d", "batch"): 0.1}).splitlines()[2]
      '| d | batch | **0.900** | 0.800 |'
    """
    sweep = [r for r in rows if r["family"] == "lr"]
    rates = sorted({r["learning_rate"] for r in sweep})
    body = []
    for dataset in _ordered(sweep, "dataset"):
        for n in _ordered(_select(sweep, dataset=dataset), "normalizer"):
            cells = [dataset, n]
            for rate in rates:
                values = [
                    r["validation_accuracy"]
                    for r in _select(sweep, dataset=dataset, normalizer=n)
                    if math.isclose(r["learning_rate"], rate)
                ]
                text = f"{sum(values) / len(values):.3f}" if values else "n/a"
                if math.isclose(chosen.get((dataset, n), -1), rate):
                    text = f"**{text}**"
                cells.append(text)
            body.append(cells)
    return _markdown(["dataset", "normalizer", *(f"lr {r:g}" for r in rates)], body)


def table_markdown(
    rows: Sequence[Mapping],
    labels: Mapping[str, str],
    chosen: Mapping[tuple[str, str], float],
    *,
    title: str,
    preamble: str,
    resamples: int = 10_000,
) -> str:
    """The whole table.md (module docstring): definitions, the rate sweep, then per dataset
    Table 1 for batch norm, accuracy per normalizer (evaluation mode, batch statistics at the
    training B), the dose-response, the momentum and length families, per-layer numbers.

    Example:
      >>> rows = [{"dataset": "d", "family": "table", "condition": "u", "normalizer": n,
      ...          "seed": s, "batch_size": 32, "skew": 0.0, "accuracy_eval": 0.9,
      ...          "accuracy_batch_stats_train_b": 0.9, "stability_excess_mean_l0": 0.0,
      ...          "learning_rate": 0.1, "bn_momentum": 0.9, "examples": 3200}
      ...         for n in ("batch", "none") for s in range(2)]
      >>> text = table_markdown(rows, {}, {}, title="T", preamble="P", resamples=100)
      >>> text.splitlines()[0], "### Test accuracy, evaluation mode" in text
      ('# T', True)
    """
    rows = with_layer_means(rows)
    n_seeds = len({r["seed"] for r in rows if r["family"] == "table"})
    parts = [
        f"# {title}",
        preamble.strip(),
        f"Cells: mean [95% bootstrap interval] over {n_seeds} seeds. † = not significantly "
        "different from batch norm in the same row (two-sided Welch, Holm over the table, "
        f"alpha {ALPHA}). Claims and their tests: verdicts.md.",
        "## Columns\n\n" + column_definitions(),
        "## Learning rates: validation accuracy per candidate (chosen in bold)\n\n"
        + rates_table(rows, chosen),
    ]
    for dataset in _ordered(rows, "dataset"):
        mine = [r for r in rows if r["dataset"] == dataset]
        table = [r for r in mine if r["family"] == "table"]
        if not table:
            continue
        parts.append(f"## {dataset}")
        batch = _select(table, normalizer="batch")
        if batch:
            parts.append(
                "### Table 1 with numbers: batch norm\n\n" + table1(batch, labels, resamples)
            )
        parts.append(
            "### Test accuracy, evaluation mode\n\n"
            + accuracy_table(table, labels, "accuracy_eval", resamples)
        )
        parts.append(
            "### Test accuracy with batch statistics at the training batch size\n\n"
            + accuracy_table(table, labels, "accuracy_batch_stats_train_b", resamples)
        )
        has_running = [r for r in table if r.get("running_bias") is not None]
        if has_running:
            parts.append(
                "### Running-statistics bias, mean part (population std)\n\n"
                + _pivot(
                    has_running,
                    "condition",
                    "normalizer",
                    "running_mean_bias",
                    ".3f",
                    resamples,
                    labels.get,
                )
                + "\n\n### Running-statistics bias, variance part (|log std ratio|)\n\n"
                + _pivot(
                    has_running,
                    "condition",
                    "normalizer",
                    "running_var_bias",
                    ".3f",
                    resamples,
                    labels.get,
                )
            )
        dose = [r for r in mine if r["family"] == "dose"]
        for n in _ordered(dose, "normalizer"):
            parts.append(
                f"### Dose-response, {n}: test accuracy (evaluation mode) by skew and B\n\n"
                + _pivot(
                    _select(dose, normalizer=n),
                    "skew",
                    "batch_size",
                    "accuracy_eval",
                    ".3f",
                    resamples,
                    lambda s: f"skew {s:g}",
                    lambda b: f"B={b}",
                )
            )
        momentum = [r for r in mine if r["family"] == "momentum"]
        if momentum:
            # Batch norm only (pooling it with batch+recalibration would hide the fix), on the
            # momentum family's conditions.
            conditions = {r["condition"] for r in momentum}
            bn = [
                r
                for r in momentum + table
                if r["normalizer"] == "batch" and r["condition"] in conditions
            ]
            for key, what in (
                ("accuracy_eval", "test accuracy, evaluation mode"),
                ("running_bias", "running-statistics bias (mean + variance parts)"),
            ):
                parts.append(
                    f"### BN momentum, batch norm: {what}\n\n"
                    + _pivot(
                        bn,
                        "condition",
                        "bn_momentum",
                        key,
                        ".3f",
                        resamples,
                        labels.get,
                        lambda m: f"momentum {m:g}",
                    )
                )
        length = [r for r in mine if r["family"] == "length"]
        if length:
            full = [
                r
                for r in table
                if (r["condition"], r["normalizer"])
                in {(x["condition"], x["normalizer"]) for x in length}
            ]
            for n in _ordered(length, "normalizer"):
                parts.append(
                    f"### Training length, {n}: test accuracy (evaluation mode)\n\n"
                    + _pivot(
                        _select(length + full, normalizer=n),
                        "condition",
                        "examples",
                        "accuracy_eval",
                        ".3f",
                        resamples,
                        labels.get,
                        lambda e: f"{e} examples",
                    )
                )
        if batch:
            deep = deepest_layer(batch)
            per_layer = []
            for c in _ordered(batch, "condition"):
                sel = _select(batch, condition=c)
                per_layer.append(
                    [labels.get(c, c)]
                    + [
                        _cell(sel, f"stability_excess_mean_l{i}", ".4f", resamples)
                        for i in range(deep + 1)
                    ]
                    + [
                        _cell(sel, f"running_mean_bias_l{i}", ".3f", resamples)
                        for i in range(deep + 1)
                    ]
                    + [
                        _cell(sel, f"running_var_bias_l{i}", ".3f", resamples)
                        for i in range(deep + 1)
                    ]
                )
            header = (
                ["condition"]
                + [f"stability excess l{i}" for i in range(deep + 1)]
                + [f"running mean bias l{i}" for i in range(deep + 1)]
                + [f"running var bias l{i}" for i in range(deep + 1)]
            )
            parts.append("### Batch norm by layer (depth)\n\n" + _markdown(header, per_layer))
    return "\n\n".join(parts) + "\n"


def verdicts_markdown(verdicts: Sequence[Verdict], *, title: str) -> str:
    """verdicts.md: one row per claim with both sides' mean [CI] per dataset, raw and Holm-
    adjusted p, and the verdict (what earlier versions of the study found: CHANGELOG.md).

    Example:
      >>> from bnjax.study.claims import Claim, Selection, verdicts
      >>> rows = [{"dataset": "d", "family": "table", "condition": c, "normalizer": "batch",
      ...          "bn_momentum": 0.9, "examples": 100, "seed": s, "acc": v + 0.01 * s}
      ...         for s in range(5) for c, v in (("u", 0.9), ("s", 0.6))]
      >>> claim = Claim("P7", "paper", "skew lowers accuracy", Selection("acc", "s"),
      ...               Selection("acc", "u"), "less")
      >>> found = verdicts(rows, [claim], momentum=0.9, budgets={"d": 100}, resamples=100)
      >>> verdicts_markdown(found, title="V").splitlines()[2][:40]
      '1 claims: 1 held on every dataset, 0 on '
    """
    datasets = list(verdicts[0].p) if verdicts else []
    header = ["claim", "source", "statement", "test"]
    for d in datasets:
        header += [f"{d}: a", f"{d}: b", f"{d}: p (Holm)"]
    header.append("verdict")
    body = []
    for v in verdicts:
        c = v.claim
        cells = [
            c.key,
            c.source,
            c.text,
            f"{c.a.metric} ({c.a.condition}, {c.a.normalizer}) vs "
            f"{c.b.metric} ({c.b.condition}, {c.b.normalizer}): {c.alternative}, {c.test}",
        ]
        for d in datasets:
            cells += [
                format_interval(v.a[d]),
                format_interval(v.b[d]),
                f"{v.p[d]:.3g} ({v.p_holm[d]:.3g})" if not math.isnan(v.p[d]) else "n/a",
            ]
        cells.append(f"**{v.verdict}**")
        body.append(cells)
    held = sum(v.verdict == "held" for v in verdicts)
    partly = sum(v.verdict.startswith("held on") for v in verdicts)
    reversed_ = sum(v.verdict.startswith("reversed") for v in verdicts)
    summary = (
        f"{len(verdicts)} claims: {held} held on every dataset, {partly} on one, "
        f"{reversed_} reversed, {len(verdicts) - held - partly - reversed_} not shown. "
        f"One-sided tests in the claimed direction; all {len(verdicts) * len(datasets)} "
        f"p-values Holm-adjusted together (alpha {ALPHA}). A minus sign in a side's selection "
        "(a drop) is its value on uniform batches minus on the named condition, seed by seed."
    )
    return f"# {title}\n\n{summary}\n\n" + _markdown(header, body) + "\n"
