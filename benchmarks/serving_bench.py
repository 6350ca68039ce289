"""Evaluation latency of ResNet-20 with batch norm folded vs unfolded, in one process.

What is timed, for each batch size (default 1 and 128, 32x32x3 images, float32):

  unfolded (args)    jit of ``model.apply(variables, x, train=False)`` with the variables passed
                     as arguments: the usual jitted evaluation; every BN is a pass over memory.
  unfolded (consts)  the same with the variables closed over (constants, as in an exported
                     program): XLA may precompute each BN's scale and shift, not remove it.
  folded             ``bnjax.lifecycle.fold_model`` (constants): BN folded into the convs.
  artifact           the folded model exported with ``bnjax.export`` (StableHLO) and reloaded
                     with ``bnjax.export.load``: what a server runs.

The variables are drawn like trained ones (statistics away from 0 and 1), and before timing
every variant is compared with the unfolded model: the run aborts if any differs by more than
1e-4 of the logits' scale. Each variant is compiled ahead of time; its executable is timed
(``--repeats`` rounds, the variants in an order rotated each round, medians) and asked for
``memory_analysis()`` (``temp_size_in_bytes``: scratch beyond arguments and outputs). Ratios
are against "unfolded (args)".

Exact command (about a minute on 2 CPU cores):

    python benchmarks/serving_bench.py
    python benchmarks/serving_bench.py --batch_sizes 1 128 --repeats 30 --out serving.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from common import abort_if_disagreeing, emit_report, fmt_mib, fmt_ratio, package_version

from bnjax import export, lifecycle, models


def trained_looking(model, images, seed: int):
    """Variables of `model` drawn like trained ones: kernels ~ 1/sqrt(fan-in), statistics,
    scales and biases away from their initial 0 and 1 (so folding has work to do)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, size=leaf.shape)
        return rng.normal(size=leaf.shape) * 0.3

    drawn = jax.tree_util.tree_map_with_path(draw, shapes)
    return jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), drawn, shapes)


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def median_ms(calls, repeats: int) -> dict[str, float]:
    """{name: median ms} of `calls` {name: thunk}, interleaved in rotating order."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the Markdown report to this path")
    args = parser.parse_args(argv)

    model = models.resnet20(num_classes=10)
    side = args.image_size
    images = np.asarray(
        jax.random.normal(jax.random.key(args.seed), (max(args.batch_sizes), side, side, 3))
    )
    variables = trained_looking(model, images[:2], args.seed)
    folded = lifecycle.fold_model(model, variables, images[:2], train=False)
    artifact_dir = os.path.join(tempfile.mkdtemp(), "resnet20")
    export.export(folded, images[:8], artifact_dir)
    served = export.load(artifact_dir)

    lines = [
        "# Serving ResNet-20: batch norm folded vs unfolded (evaluation mode)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"jax {package_version('jax')}, flax {package_version('flax')}, backend "
        f"{jax.default_backend()}; {side}x{side}x3 images, float32, median of {args.repeats}",
        "",
        f"Fold: {len(folded.plan.pairs)} of {len(folded.plan.norms)} batch norms folded.",
        "",
        "| batch | variant | ms | vs unfolded (args) | temp MiB | max error / logits' scale |",
        "|---|---|---|---|---|---|",
    ]
    for batch in args.batch_sizes:
        x = images[:batch]
        unfolded_args = compiled(lambda v, x: model.apply(v, x, train=False), variables, x)
        unfolded_consts = compiled(lambda x: model.apply(variables, x, train=False), x)
        folded_exec = compiled(folded, x)
        reference = np.asarray(unfolded_args(variables, x))
        calls = {
            "unfolded (args)": lambda: unfolded_args(variables, x),  # noqa: B023
            "unfolded (consts)": lambda: unfolded_consts(x),  # noqa: B023
            "folded": lambda: folded_exec(x),  # noqa: B023
            "artifact": lambda: served(x),  # noqa: B023
        }
        scale = float(np.abs(reference).max())
        # Each variant's largest difference from the unfolded model, in units of the logits'
        # largest magnitude (the tolerance `bnjax.export.verify` applies is 1e-4).
        errors = {
            name: float(np.max(np.abs(np.asarray(call()) - reference))) / scale
            for name, call in calls.items()
        }
        failures = [
            f"{name}: max |difference| {error:.3g} of the logits' scale > 1e-4"
            for name, error in errors.items()
            if error > 1e-4
        ]
        abort_if_disagreeing(failures, "the folded and unfolded models")
        times = median_ms(calls, args.repeats)
        memory = {
            "unfolded (args)": unfolded_args,
            "unfolded (consts)": unfolded_consts,
            "folded": folded_exec,
        }
        for name, ms in times.items():
            analysis = memory[name].memory_analysis() if name in memory else None
            temp = None if analysis is None else analysis.temp_size_in_bytes / 2**20
            lines.append(
                f"| {batch} | {name} | {ms:.3f} | {fmt_ratio(ms, times['unfolded (args)'])} | "
                f"{fmt_mib(temp)} | {errors[name]:.2g} |"
            )
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
