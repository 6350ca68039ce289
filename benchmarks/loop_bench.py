"""Training-loop overhead: `bnjax.train.loop.train_and_evaluate`'s steps/s against a bare chain
of the same jitted step on the same batches.

What is measured: the default run (``configs/default.py``: the small CNN with batch norm on
the generated clusters, batch 128), shortened to ``--num_steps`` steps, trained by
``loop.train_and_evaluate`` in a temporary workdir, against a bare Python loop
``state, metrics = run(state, batch)`` over the same batches with the same ``run``, the
loop's own compiled step (jit mode, state donated).

How:

  * The loop is instrumented, not changed: ``loop._runner`` is wrapped so that the step
    function it builds counts its calls, keeps each batch it is given and notes two times:
    just before call ``--warmup`` + 1 (compilation, the first steps and the setup are behind
    it) and after the last call, once ``jax.block_until_ready`` returned on its outputs. The
    loop's timed window is every step after the warm-up with everything the loop does between
    steps (the data pipeline making each batch, metric queueing and fetches at log steps, the
    progress display, checkpoint and evaluation decisions).
  * Mid-run evaluation and checkpoints are off by default (``eval_every`` and
    ``checkpoint_every`` = ``--num_steps``: the last step is still evaluated and saved, after
    the timed window), so the ratio is the loop's own per-step overhead; ``--real_run`` keeps
    the default config's evaluations and checkpoints every 200 steps inside the window.
    ``log_every`` stays the default's 50.
  * The bare chain then replays the batches the loop's timed steps consumed (pre-made numpy
    batches: it pays their host-to-device copy like the loop, not their making) through the
    same ``run`` (already compiled), from the loop's final state: ``--warmup`` untimed calls,
    then all of them timed to ``jax.block_until_ready`` on the last outputs.
  * ratio = loop steps/s / bare steps/s (wall clock; goal >= 0.97). The CPU ratio = the bare
    chain's process CPU seconds (all threads: XLA's CPU backend computes the steps on the
    host's cores) over the loop's, for the same steps: the work the loop adds, less sensitive
    than wall-clock time to other processes on a shared machine (but blind to idle waits).
    ``--rounds`` repeats the pair, in an order alternating from round to round (even rounds
    time the bare chain first, on the previous round's step and batches) to spread drift
    evenly; the table reports each round and the median ratios.

Exact command (defaults: 400 steps, 50 warm-up, 1 round; about 40 s per round on 2 idle CPU
cores):

    python benchmarks/loop_bench.py
    python benchmarks/loop_bench.py --num_steps 600 --rounds 3 --out loop.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np
from common import emit_report, package_version

import bnjax
from bnjax.train import loop
from bnjax.train.defaults import base_config


class InstrumentedRunner:
    """Wraps `loop._runner`: the step function it returns times the loop's steps after the
    warm-up and keeps their batches and its final state for the bare chain."""

    def __init__(self, warmup: int, num_steps: int):
        self.warmup, self.num_steps = warmup, num_steps
        self.calls, self.batches = 0, []
        self.run = self.state = self.started = self.ended = None
        self.cpu_started = self.cpu_ended = None

    def __call__(self, config, mesh, train_step):
        self.run = run = self._runner(config, mesh, train_step)

        def timed_run(state, batch):
            self.calls += 1
            if self.calls == self.warmup + 1:
                self.started, self.cpu_started = time.perf_counter(), time.process_time()
            state, metrics = run(state, batch)
            if self.calls > self.warmup:
                self.batches.append(batch)
            if self.calls == self.num_steps:
                jax.block_until_ready((state, metrics))
                self.ended, self.cpu_ended = time.perf_counter(), time.process_time()
                self.state = state
            return state, metrics

        return timed_run

    def install(self):
        self._runner = loop._runner
        loop._runner = self
        return self

    def uninstall(self):
        loop._runner = self._runner

    @property
    def seconds(self) -> tuple[float, float]:
        """(wall-clock, process CPU) seconds of the timed steps."""
        return self.ended - self.started, self.cpu_ended - self.cpu_started


def bench_config(args):
    config = base_config()
    config.num_steps = args.num_steps
    config.progress = False
    if not args.real_run:
        config.eval_every = config.checkpoint_every = args.num_steps
    return config


def time_loop(args) -> InstrumentedRunner:
    """One run of `loop.train_and_evaluate`, instrumented (see the module docstring)."""
    recorder = InstrumentedRunner(args.warmup, args.num_steps).install()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            loop.train_and_evaluate(bench_config(args), workdir)
    finally:
        recorder.uninstall()
    if recorder.ended is None:
        raise SystemExit("ABORT: the loop did not reach its last step")
    return recorder


def time_bare_chain(recorder: InstrumentedRunner, warmup: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds the loop's compiled step takes chained over the
    loop's timed batches."""
    run, state = recorder.run, recorder.state
    for batch in recorder.batches[:warmup]:
        state, metrics = run(state, batch)
    jax.block_until_ready(state)
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in recorder.batches:
        state, metrics = run(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - started, time.process_time() - cpu_started
    recorder.state = state  # the one it started from was donated: the next chain goes on here
    return seconds


def environment_lines(args) -> list[str]:
    device = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    window = (
        "evaluation and checkpoint every 200 steps, inside the timed window"
        if args.real_run
        else "evaluation and checkpoint at the last step only, after the timed window"
    )
    return [
        f"- jax {jax.__version__}, jaxlib {package_version('jaxlib')}, bnjax "
        f"{bnjax.__version__}, numpy {np.__version__}",
        f"- backend: {jax.default_backend()}, device: {device.device_kind} ({device}), "
        f"{jax.device_count()} device(s); host: {platform.machine()}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}; load average at the end {load:.1f}",
        f"- configs/default.py with num_steps={args.num_steps} ({window}), log_every 50; "
        f"{args.warmup} warm-up steps untimed, {args.num_steps - args.warmup} timed steps per "
        f"side, {args.rounds} round(s)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_steps", type=int, default=400, help="steps of the shortened run")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps per side")
    parser.add_argument("--rounds", type=int, default=1, help="loop + bare pairs (median)")
    parser.add_argument(
        "--real_run",
        action="store_true",
        help="keep the default config's evaluations and checkpoints (every 200 steps)",
    )
    parser.add_argument("--out", help="also write the Markdown report to this path")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.num_steps - 1 or args.rounds < 1:
        parser.error("need 0 <= --warmup < --num_steps - 1 and --rounds >= 1")

    started = time.perf_counter()
    rows, ratios, cpu_ratios, recorder = [], [], [], None
    for number in range(1, args.rounds + 1):
        # Odd rounds: the loop, then the bare chain; even rounds: the bare chain first (the
        # previous round's step and batches: the same computation), spreading drift evenly.
        bare = time_bare_chain(recorder, args.warmup) if number % 2 == 0 else None
        print(f"== round {number}: loop.train_and_evaluate, {args.num_steps} steps", flush=True)
        recorder = time_loop(args)
        timed = len(recorder.batches)
        if bare is None:
            print(f"   bare chain of the same step over its {timed} timed batches", flush=True)
            bare = time_bare_chain(recorder, args.warmup)
        (loop_wall, loop_cpu), (bare_wall, bare_cpu) = recorder.seconds, bare
        loop_rate, bare_rate = timed / loop_wall, timed / bare_wall
        ratios.append(loop_rate / bare_rate)
        cpu_ratios.append(bare_cpu / loop_cpu)
        rows.append(
            f"| {number} | {timed} | {loop_rate:.1f} | {bare_rate:.1f} | {ratios[-1]:.3f} "
            f"| {1e3 * loop_cpu / timed:.1f} | {1e3 * bare_cpu / timed:.1f} "
            f"| {cpu_ratios[-1]:.3f} |"
        )
        print(
            f"   loop {loop_rate:.1f} steps/s, bare {bare_rate:.1f} steps/s; CPU ms/step "
            f"loop {1e3 * loop_cpu / timed:.1f}, bare {1e3 * bare_cpu / timed:.1f}",
            flush=True,
        )
    median, cpu_median = statistics.median(ratios), statistics.median(cpu_ratios)
    report = [
        "## Training loop overhead: train_and_evaluate against a bare chain of its step",
        "",
        *environment_lines(args),
        "",
        "| round | timed steps | loop steps/s | bare steps/s | ratio loop / bare "
        "| loop CPU ms/step | bare CPU ms/step | CPU ratio bare / loop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Median ratio (wall clock): {median:.3f}; median CPU ratio: {cpu_median:.3f} (goal "
        f">= 0.97). Total benchmark time: {time.perf_counter() - started:.0f} s.",
    ]
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
