"""The test-time adaptation table: each method on shifted, ordered test streams.

For each data set (the generated clusters, sklearn's digits) and seed s, a SmallCNN with batch
norm trains on the training split (uniform batches; seed s sets the initialisation and the
batch order). Its test split is then shifted and served as a stream:

- shifts (on the standardized images, every channel mean ~0 and std ~1): ``contrast``
  (x -> 0.7 x), ``offset`` (x -> x + 0.6), ``noise`` (x -> x + z, z ~ N(0, 1) per value,
  drawn with seed s);
- orders (independent of the batch size, so that B = 1 streams have the same structure):
  ``uniform`` (a random permutation), ``skewed`` (segments of 32 examples, 80% of each from
  one class, the dominant class moving through a random permutation of the classes, the rest
  at random), ``one_class`` (every example of one class, then the next: one class at a time);
- batch sizes B = 1, 16, 128 (the last incomplete batch is dropped: digits at B = 128 serves
  256 of its 359 test examples).

Each method of `bnjax.lifecycle.METHODS` adapts along the stream (continual, one update per
batch, ``optax.adam(1e-3)`` for TENT and DELTA as in their CIFAR settings; TBR/DOT momenta
0.95, TBR starting from the source statistics), and ``adabn_offline`` (`adapt_statistics` on the
whole shifted test split, then evaluation) is the transductive reference. Accuracy is over the
served examples; the table gives the mean over seeds and the half-width of the 95% Student-t
interval of the mean.

Everything here is fixed before results are seen: the shifts' sizes were chosen on the source
model's accuracy alone (so that no shift puts the source model at chance or leaves it intact),
never on an adaptation method's result.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bnjax import data, lifecycle, models

SHIFTS = ("contrast", "offset", "noise")
ORDERS = ("uniform", "skewed", "one_class")
BATCH_SIZES = (1, 16, 128)
METHODS = ("source", "adabn_offline", "adabn", "test_batch", "tent", "tbr", "delta")
DATASETS = ("clusters", "digits")
SEGMENT, SEGMENT_SKEW = 32, 0.8


class Settings(NamedTuple):
    """What one table run uses (defaults: the committed table)."""

    datasets: Sequence[str] = DATASETS
    seeds: int = 5
    train_steps: int = 800
    train_batch: int = 64
    learning_rate: float = 0.05
    features: Sequence[int] = (16, 32)
    adapt_learning_rate: float = 1e-3
    shifts: Sequence[str] = SHIFTS
    orders: Sequence[str] = ORDERS
    batch_sizes: Sequence[int] = BATCH_SIZES
    methods: Sequence[str] = METHODS
    test_examples: int | None = None  # None: the whole test split


QUICK = Settings(
    datasets=("digits",),
    seeds=2,
    train_steps=150,
    batch_sizes=(16,),
    shifts=("offset",),
    orders=("uniform", "one_class"),
)


def shift_images(images: np.ndarray, shift: str, seed: int) -> np.ndarray:
    """The test images under a covariate shift (see the module docstring)."""
    if shift == "contrast":
        return (0.7 * images).astype(np.float32)
    if shift == "offset":
        return (images + 0.6).astype(np.float32)
    if shift == "noise":
        noise = np.random.default_rng(1000 + seed).standard_normal(images.shape)
        return (images + 1.0 * noise).astype(np.float32)
    raise ValueError(f"`shift`={shift!r} is not one of {SHIFTS}.")


def stream_order(labels: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The indices of the test examples in serving order (see the module docstring)."""
    rng = np.random.default_rng(2000 + seed)
    labels = np.asarray(labels)
    if order == "uniform":
        return rng.permutation(len(labels))
    classes = rng.permutation(np.unique(labels))
    pools = {k: list(rng.permutation(np.flatnonzero(labels == k))) for k in classes}
    if order == "one_class":
        return np.concatenate([np.asarray(pools[k], np.int64) for k in classes])
    if order != "skewed":
        raise ValueError(f"`order`={order!r} is not one of {ORDERS}.")
    result: list[int] = []
    segment = 0
    while any(pools.values()):
        dominant = classes[segment % len(classes)]
        segment += 1
        take = min(round(SEGMENT_SKEW * SEGMENT), len(pools[dominant]))
        chosen = [pools[dominant].pop() for _ in range(take)]
        rest = [k for k in classes if pools[k]]
        while len(chosen) < SEGMENT and rest:
            k = rest[rng.integers(len(rest))]
            chosen.append(pools[k].pop())
            rest = [k for k in classes if pools[k]]
        result.extend(int(i) for i in rng.permutation(chosen))
    return np.asarray(result, np.int64)


def train_source(train: data.Dataset, settings: Settings, seed: int):
    """(model, variables) of a SmallCNN with batch norm trained on uniform batches."""
    model = models.SmallCNN(features=tuple(settings.features), num_classes=train.num_classes)
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    variables = model.init(jax.random.key(seed), images[:2], train=False)
    tx = optax.sgd(settings.learning_rate, momentum=0.9)
    opt_state = tx.init(variables["params"])

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def step(carry, rows):
        params, batch_stats, opt_state = carry
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(
            params, batch_stats, images[rows], labels[rows]
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), None

    rng = np.random.default_rng(seed)
    rows = np.stack(
        [
            rng.choice(len(labels), settings.train_batch, replace=False)
            for _ in range(settings.train_steps)
        ]
    )
    carry = (variables["params"], variables["batch_stats"], opt_state)
    carry, _ = jax.jit(lambda c, r: lax.scan(step, c, r))(carry, jnp.asarray(rows))
    return model, {"params": carry[0], "batch_stats": carry[1]}


def _adapter(model, variables, method: str, settings: Settings, num_classes: int):
    optimizer = optax.adam(settings.adapt_learning_rate)
    needs = lifecycle.METHODS[method].objective is not None
    return lifecycle.adapter(
        model,
        variables,
        method=method,
        optimizer=optimizer if needs else None,
        num_classes=num_classes,
        apply_kwargs={"train": False},
    )


@functools.cache
def _stream_runner(model, method: str, settings: Settings, num_classes: int):
    """jit(vmap over seeds) of: build the adapter from the seed's variables, scan the stream."""

    def run(variables, batches):
        adapter = _adapter(model, variables, method, settings, num_classes)
        _, logits = lax.scan(lambda s, b: adapter.step(s, b)[::-1], adapter.init(), batches)
        return jnp.argmax(logits, axis=-1)

    return jax.jit(jax.vmap(run))


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def t_interval_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the Student-t interval of the mean of `values` (0 for one value)."""
    from scipy import stats as scipy_stats

    values = np.asarray(values, np.float64)
    if values.size < 2:
        return 0.0
    sem = values.std(ddof=1) / math.sqrt(values.size)
    return float(scipy_stats.t.ppf((1 + confidence) / 2, values.size - 1) * sem)


def run_table(settings: Settings | None = None, progress=print) -> list[dict]:
    """Every (dataset, shift, order, B, method, seed) accuracy, as rows of a table."""
    settings = Settings() if settings is None else settings
    rows = []
    for name in settings.datasets:
        train, test = data.load(name, "train"), data.load(name, "test")
        if settings.test_examples is not None:
            test = test.subset(np.arange(min(settings.test_examples, len(test))))
        trained = [train_source(train, settings, seed) for seed in range(settings.seeds)]
        model = trained[0][0]
        stacked = _stack([v for _, v in trained])
        for shift in settings.shifts:
            shifted = [shift_images(test.images, shift, seed) for seed in range(settings.seeds)]
            offline = {}
            if "adabn_offline" in settings.methods:
                for seed, (_, variables) in enumerate(trained):
                    batches = [
                        jnp.asarray(shifted[seed][i : i + 128]) for i in range(0, len(test), 128)
                    ]
                    adapted = lifecycle.adapt_statistics(
                        model, variables, batches, apply_kwargs={"train": False}
                    )
                    predictions = model.apply(adapted, jnp.asarray(shifted[seed]), train=False)
                    offline[seed] = np.asarray(jnp.argmax(predictions, -1))
            for order in settings.orders:
                orders = [stream_order(test.labels, order, seed) for seed in range(settings.seeds)]
                for batch_size in settings.batch_sizes:
                    served = (len(test) // batch_size) * batch_size
                    index = np.stack([o[:served] for o in orders])  # (S, served)
                    images = np.stack([shifted[s][index[s]] for s in range(settings.seeds)])
                    labels = test.labels[index]
                    batches = jnp.asarray(
                        images.reshape(settings.seeds, -1, batch_size, *images.shape[2:])
                    )
                    for method in settings.methods:
                        if method == "adabn_offline":
                            predicted = np.stack(
                                [offline[s][index[s]] for s in range(settings.seeds)]
                            )
                        else:
                            runner = _stream_runner(model, method, settings, test.num_classes)
                            predicted = np.asarray(runner(stacked, batches)).reshape(
                                settings.seeds, -1
                            )
                        for seed in range(settings.seeds):
                            rows.append(
                                {
                                    "dataset": name,
                                    "shift": shift,
                                    "order": order,
                                    "batch_size": batch_size,
                                    "method": method,
                                    "seed": seed,
                                    "accuracy": float(np.mean(predicted[seed] == labels[seed])),
                                }
                            )
                    progress(f"{name} {shift} {order} B={batch_size}: done")
    return rows


def clean_accuracy(settings: Settings, name: str) -> list[float]:
    """The source models' accuracy on the unshifted test split (the shifts' reference)."""
    train, test = data.load(name, "train"), data.load(name, "test")
    result = []
    for seed in range(settings.seeds):
        model, variables = train_source(train, settings, seed)
        logits = model.apply(variables, jnp.asarray(test.images), train=False)
        result.append(float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test.labels)))
    return result


def write_csv(rows: list[dict], path: Path) -> None:
    """Writes the table's rows (`run_table`) as a CSV file with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """The rows of a `write_csv` file, with numbers as numbers."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["batch_size"], row["seed"] = int(row["batch_size"]), int(row["seed"])
        row["accuracy"] = float(row["accuracy"])
    return rows


def summarize(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """{(dataset, shift, order, B, method): (mean, t half-width, seeds)}."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["dataset"], row["shift"], row["order"], row["batch_size"], row["method"])
        groups.setdefault(key, []).append(row["accuracy"])
    return {k: (float(np.mean(v)), t_interval_half_width(v), len(v)) for k, v in groups.items()}


def markdown_table(rows: list[dict]) -> str:
    """The table: one row per (dataset, shift, order, B), one column per method."""
    summary = summarize(rows)
    methods = [m for m in METHODS if any(k[4] == m for k in summary)]
    cells = sorted(
        {k[:4] for k in summary},
        key=lambda k: (
            DATASETS.index(k[0]) if k[0] in DATASETS else 99,
            SHIFTS.index(k[1]),
            ORDERS.index(k[2]),
            k[3],
        ),
    )
    lines = [
        "| data | shift | order | B | " + " | ".join(methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for cell in cells:
        best = max(summary[(*cell, m)][0] for m in methods)
        entries = []
        for m in methods:
            mean, half, _ = summary[(*cell, m)]
            text = f"{mean:.3f} ± {half:.3f}"
            entries.append(f"**{text}**" if mean == best else text)
        lines.append(
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | " + " | ".join(entries) + " |"
        )
    return "\n".join(lines) + "\n"


def against_source(rows: list[dict]) -> str:
    """Per (order, B): for each method, its mean accuracy minus the source model's, averaged
    over data sets and shifts, and in how many cells it is below the source by more than the
    source's own interval half-width."""
    summary = summarize(rows)
    methods = [m for m in METHODS if m != "source" and any(k[4] == m for k in summary)]
    keys = sorted({(k[2], k[3]) for k in summary}, key=lambda k: (ORDERS.index(k[0]), k[1]))
    lines = [
        "| order | B | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for order, batch_size in keys:
        cells = [
            k[:4] for k in summary if k[2] == order and k[3] == batch_size and k[4] == "source"
        ]
        entries = []
        for m in methods:
            deltas, worse = [], 0
            for cell in cells:
                source_mean, _, _ = summary[(*cell, "source")]
                mean, half, _ = summary[(*cell, m)]
                deltas.append(mean - source_mean)
                worse += mean < source_mean - half
            entries.append(f"{np.mean(deltas):+.3f} ({worse}/{len(cells)} below)")
        lines.append(f"| {order} | {batch_size} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"
