"""The study's written results: `results.csv` (one row per run) and `table.md` (mean ± std).

`table.md` holds, in order:

1. The paper's Table 1 with numbers: batch norm under the five conditions, one column group per
   Table 1 column (BN statistical stability, convergence, gradient noise, running-statistics
   bias, inference accuracy, representation coherence).
2. Held-out accuracy in evaluation mode for every condition x normalizer (which fix repairs
   which failure), and the running-statistics bias of the normalizers that keep running
   statistics.
3. The same Table 1 layout for every normalizer.
4. The batch-size sweep: accuracy against batch size for each normalizer.

Cells are "mean ± std" over seeds (`bnjax.study.format_mean_std`); "n/a" where a metric does
not apply (no running statistics) and "(k/n)" where only k of n seeds gave a finite value
(a diverged run, or a loss target never reached).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence

from bnjax.study.evaluation import format_mean_std, mean_std

# (column heading, results key, format) of the Table 1 layout; {deep} is the deepest layer.
TABLE1_COLUMNS = (
    ("stability: batch mean, layer 0", "stability_mean_l0", ".4f"),
    ("stability: batch mean, layer {deep}", "stability_mean_l{deep}", ".4f"),
    ("stability: batch var, layer {deep}", "stability_var_l{deep}", ".4f"),
    ("final loss", "final_loss", ".3f"),
    ("loss oscillation", "loss_oscillation", ".3f"),
    ("steps to loss target", "steps_to_target", ".0f"),
    ("gradient noise (1 - cos)", "gradient_noise", ".3f"),
    ("update noise (1 - cos)", "update_noise", ".3f"),
    ("running-stat bias", "running_bias", ".3f"),
    ("accuracy, eval mode", "accuracy_eval", ".3f"),
    ("accuracy, batch stats", "accuracy_batch_stats", ".3f"),
    ("silhouette", "silhouette", ".3f"),
    ("intra/inter distance", "intra_inter", ".3f"),
)


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    """All rows, columns in first-seen order; a missing value or None is an empty cell.

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
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_csv(path: str) -> list[dict]:
    """`write_csv`'s rows back: each cell an int if it reads as one, else a float if it reads as
    one, else the string; '' (an empty cell) as None. Every row has every column.

    Example:
      >>> import os, tempfile
      >>> rows = [{"seed": 0, "accuracy": 0.5}, {"seed": 1, "accuracy": None, "note": "nan loss"}]
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "results.csv")
      ...     write_csv(rows, path)
      ...     back = read_csv(path)
      >>> back[0]  # every row has every column
      {'seed': 0, 'accuracy': 0.5, 'note': None}
      >>> back[1]
      {'seed': 1, 'accuracy': None, 'note': 'nan loss'}
    """
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                parsed[k] = _parse(v)
            out.append(parsed)
    return out


def _parse(value: str):
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _select(rows, **where) -> list[Mapping]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _cell(rows: Sequence[Mapping], key: str, fmt: str) -> str:
    values = [r.get(key) for r in rows]
    if not values or all(v is None for v in values):
        return "n/a"
    return format_mean_std(mean_std(values), fmt)


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _ordered(rows, key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


def deepest_layer(rows: Sequence[Mapping]) -> int:
    """Index of the deepest norm layer with a stability column (`stability_mean_l{i}`).

    Example:
      >>> deepest_layer([{"stability_mean_l0": 0.1, "stability_mean_l2": 0.3, "seed": 0}])
      2
    """
    prefix = "stability_mean_l"
    layers = [int(k[len(prefix) :]) for r in rows for k in r if k.startswith(prefix)]
    if not layers:
        raise ValueError("rows: no stability_mean_l* columns")
    return max(layers)


def table1(rows: Sequence[Mapping], normalizer: str, labels: Mapping[str, str]) -> str:
    """The Table 1 layout for one normalizer: a row per condition, mean ± std over seeds.

    Columns as in TABLE1_COLUMNS, "n/a" where the rows lack a metric.

    Example:
      >>> rows = [{"study": "table", "condition": "skewed", "normalizer": "batch", "seed": s,
      ...          "stability_mean_l0": v, "stability_mean_l1": 2 * v, "final_loss": 1.5}
      ...         for s, v in [(0, 0.01), (1, 0.03)]]
      >>> lines = table1(rows, "batch", {"skewed": "class-skewed"}).splitlines()
      >>> lines[0].split(" | ")[:3]
      ['| condition', 'stability: batch mean, layer 0', 'stability: batch mean, layer 1']
      >>> lines[2].split(" | ")[:5]
      ['| class-skewed', '0.0200 ± 0.0141', '0.0400 ± 0.0283', 'n/a', '1.500 ± 0.000']
    """
    chosen = _select(rows, study="table", normalizer=normalizer)
    deep = deepest_layer(chosen)
    header = ["condition"] + [h.format(deep=deep) for h, _, _ in TABLE1_COLUMNS]
    body = []
    for condition in _ordered(chosen, "condition"):
        runs = _select(chosen, condition=condition)
        body.append(
            [labels.get(condition, condition)]
            + [_cell(runs, key.format(deep=deep), fmt) for _, key, fmt in TABLE1_COLUMNS]
        )
    return _markdown(header, body)


def grid_table(
    rows: Sequence[Mapping],
    key: str,
    labels: Mapping[str, str],
    fmt=".3f",
    normalizers: Sequence[str] | None = None,
) -> str:
    """One metric, conditions x normalizers (main grid: rows with study 'table').

    Example:
      >>> rows = [{"study": "table", "condition": c, "normalizer": n, "accuracy_eval": a}
      ...         for c, n, a in [("uniform", "batch", 0.9), ("uniform", "group", 0.8),
      ...                         ("skewed", "batch", 0.5), ("skewed", "group", 0.8)]]
      >>> print(grid_table(rows, "accuracy_eval", {"skewed": "class-skewed"}))
      | condition | batch | group |
      |---|---|---|
      | uniform | 0.900 | 0.800 |
      | class-skewed | 0.500 | 0.800 |
    """
    chosen = _select(rows, study="table")
    normalizers = normalizers or _ordered(chosen, "normalizer")
    header = ["condition", *normalizers]
    body = [
        [labels.get(c, c)]
        + [_cell(_select(chosen, condition=c, normalizer=n), key, fmt) for n in normalizers]
        for c in _ordered(chosen, "condition")
    ]
    return _markdown(header, body)


def sweep_table(rows: Sequence[Mapping], key: str, fmt: str = ".3f") -> str:
    """One metric of the batch-size sweep (rows with study 'sweep'), batch sizes x normalizers.

    Example:
      >>> rows = [{"study": "sweep", "normalizer": n, "batch_size": b, "accuracy_eval": a}
      ...         for n, b, a in [("batch", 2, 0.25), ("batch", 2, 0.75), ("batch", 32, 0.9),
      ...                         ("group", 2, 0.8), ("group", 32, 0.8)]]
      >>> print(sweep_table(rows, "accuracy_eval", fmt=".2f"))
      | batch size | batch | group |
      |---|---|---|
      | 2 | 0.50 ± 0.35 | 0.80 |
      | 32 | 0.90 | 0.80 |
    """
    chosen = _select(rows, study="sweep")
    normalizers = _ordered(chosen, "normalizer")
    sizes = sorted({r["batch_size"] for r in chosen})
    body = [
        [str(b)]
        + [_cell(_select(chosen, batch_size=b, normalizer=n), key, fmt) for n in normalizers]
        for b in sizes
    ]
    return _markdown(["batch size", *normalizers], body)


def table_markdown(rows: Sequence[Mapping], labels: Mapping[str, str], *, title: str) -> str:
    """The whole `table.md` (module docstring).

    Example:
      >>> rows = [{"study": "table", "condition": "uniform", "normalizer": n, "seed": 0,
      ...          "stability_mean_l0": 0.1, "accuracy_eval": 0.9, "running_bias": bias}
      ...         for n, bias in [("batch", 0.05), ("group", None)]]
      >>> text = table_markdown(rows, {}, title="Study")
      >>> print("\\n".join(line for line in text.splitlines() if line.startswith("#")))
      # Study
      ## Table 1 with numbers: batch
      ## Held-out accuracy in evaluation mode: which normalizer repairs what
      ## Held-out accuracy with batch statistics
      ## Running-statistics bias (0 = the population's statistics)
      ## Table 1 layout: group
    """
    rows = list(rows)
    seeds = len({r["seed"] for r in rows})
    plural = "s" if seeds > 1 else ""
    parts = [
        f"# {title}",
        "",
        f'Mean ± std over {seeds} seed{plural}; see README.md, "The '
        'batch-composition study", for what each column measures.',
        "",
    ]
    main = _select(rows, study="table")
    if main:
        normalizers = _ordered(main, "normalizer")
        first = "batch" if "batch" in normalizers else normalizers[0]
        parts += [f"## Table 1 with numbers: {first}", "", table1(rows, first, labels), ""]
        parts += [
            "## Held-out accuracy in evaluation mode: which normalizer repairs what",
            "",
            grid_table(rows, "accuracy_eval", labels),
            "",
        ]
        parts += [
            "## Held-out accuracy with batch statistics",
            "",
            grid_table(rows, "accuracy_batch_stats", labels),
            "",
        ]
        with_stats = [
            n
            for n in normalizers
            if any(r.get("running_bias") is not None for r in _select(main, normalizer=n))
        ]
        if with_stats:
            bias = grid_table(rows, "running_bias", labels, normalizers=with_stats)
            parts += ["## Running-statistics bias (0 = the population's statistics)", "", bias, ""]
        for n in normalizers:
            if n != first:
                parts += [f"## Table 1 layout: {n}", "", table1(rows, n, labels), ""]
    if _select(rows, study="sweep"):
        parts += [
            "## Batch-size sweep (uniform batches): accuracy in evaluation mode",
            "",
            sweep_table(rows, "accuracy_eval"),
            "",
        ]
        parts += [
            "## Batch-size sweep: accuracy with batch statistics",
            "",
            sweep_table(rows, "accuracy_batch_stats"),
            "",
        ]
    return "\n".join(parts)
