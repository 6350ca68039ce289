"""Training-step speed and compiled memory of ResNet-20 with bnjax BN against flax.linen BN.

What is measured: one full training step of ``bnjax.models.resnet20(norm="batch")`` (CIFAR
ResNet-20, 21 batch-norm layers, 0.27M parameters) on random 32x32x3 images with random labels:
forward in training mode, softmax cross-entropy, backward, the ``batch_stats`` update
(``mutable=["batch_stats"]``) and an SGD-with-momentum update (``optax.sgd(0.1, momentum=0.9)``),
jitted with the training state (params, batch_stats, optimizer state) donated. The same step is
measured twice in one process: once with ``bnjax.linen.BatchNorm`` (the model as shipped) and
once with ``flax.linen.BatchNorm``, both at their defaults (momentum 0.99, epsilon 1e-5; flax
with ``use_fast_variance=True``). The rest of the network (convolutions, ReLU, pooling, head)
is the same code on both sides, so the ratios show what the norm choice costs or saves in a
whole training step rather than in the norm op alone (``benchmarks/norm_bench.py``).

How:

  * The flax variant is the same model class given ``norm=flax.linen.BatchNorm`` (the models
    take a norm module factory), so nothing else changes. The script checks that the norms
    differ (the steps compile to different HLO) and that the variables are exactly the same
    collections, with the same tree structure, shapes and initial values on both sides.
  * Both steps start from the same variables (bnjax's init). Before timing, two steps are run
    on each side from those variables and compared: the losses of both steps must agree to
    1e-4 (relative, 2e-2 for bfloat16) and the updated params and batch_stats to 1e-3
    (normalized max difference, 5e-2 for bfloat16); otherwise the run aborts, because the two
    columns would not time the same computation. The second loss depends on the first step's
    gradients.
  * Each step is compiled ahead of time (``jax.jit(step, donate_argnums=0).lower(...).compile()``);
    the executable is timed and asked for ``memory_analysis()``: temp is XLA's scratch beyond
    arguments and outputs (the saved activations of the backward pass live there).
  * Timing: ``--warmup`` untimed steps per side, then ``--steps`` rounds; in each round one
    bnjax step and one flax step run, in an order alternating from round to round to spread
    drift evenly. Each step feeds its donated state forward (as in training) and is timed to
    ``jax.block_until_ready``. The table reports medians, images/s = batch / median step time,
    and ratios bnjax / flax (lower is better for bnjax).
  * ``--dtype bfloat16``: the model computes in bfloat16 (``resnet20(dtype=bfloat16)``, which
    both norm layers inherit) with float32 parameters, statistics and loss.

Exact command (defaults: batch 128, float32, 20 timed rounds after 3 warm-up steps per side;
60-90 s on 2 CPU cores; bfloat16 about as long):

    python benchmarks/train_bench.py
    python benchmarks/train_bench.py --batch_size 256 --steps 30 --dtype bfloat16 --out train.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    abort_if_disagreeing,
    emit_report,
    fmt_mib,
    fmt_ratio,
    fusion_count,
    package_version,
)

import bnjax
from bnjax import models

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
LEARNING_RATE = 0.1
SGD_MOMENTUM = 0.9
MIB = 2.0**20


@dataclasses.dataclass
class Side:
    """One model variant: its compiled step, its own chain of training states, its timings."""

    name: str
    model: Any
    compiled: Any = None
    memory: Any = None
    hlo: str = ""
    state: Any = None
    times: list[float] = dataclasses.field(default_factory=list)

    def step(self, images, labels):
        self.state, loss = self.compiled(self.state, images, labels)
        return jax.block_until_ready(loss)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


def make_train_step(model, tx):
    """(state, images, labels) -> (new state, loss); state = (params, batch_stats, opt_state)."""

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def train_step(state, images, labels):
        params, batch_stats, opt_state = state
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(params, batch_stats, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), loss

    return train_step


def copy_tree(tree):
    """A fresh copy of every buffer (each side's state is donated, i.e. consumed, by a step)."""
    return jax.tree.map(jnp.copy, tree)


def init_variables(model, key, images) -> dict:
    return model.init(key, images, train=False)


def check_same_variables(b_vars: dict, f_vars: dict) -> None:
    """bnjax and flax BN create the same params and batch_stats (structure, shapes, values)."""
    if set(b_vars) != set(f_vars):
        raise SystemExit(
            f"ABORT: collections differ: bnjax {sorted(b_vars)}, flax {sorted(f_vars)}"
        )
    for collection in ("params", "batch_stats"):
        b, f = b_vars[collection], f_vars[collection]
        b_def, f_def = jax.tree.structure(b), jax.tree.structure(f)
        if b_def != f_def:
            raise SystemExit(f"ABORT: {collection} trees differ:\n  bnjax {b_def}\n  flax  {f_def}")
        for path_b, leaf_b in jax.tree_util.tree_leaves_with_path(b):
            leaf_f = _get(f, path_b)
            if leaf_b.shape != leaf_f.shape or leaf_b.dtype != leaf_f.dtype:
                raise SystemExit(
                    f"ABORT: {collection}{jax.tree_util.keystr(path_b)}: bnjax "
                    f"{leaf_b.dtype}{leaf_b.shape}, flax {leaf_f.dtype}{leaf_f.shape}"
                )
            if not np.array_equal(np.asarray(leaf_b), np.asarray(leaf_f)):
                raise SystemExit(
                    f"ABORT: {collection}{jax.tree_util.keystr(path_b)}: initial values differ"
                )


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def normalized_max_diff(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def check_agreement(sides, images, labels, initial_state, loss_tol, tree_tol) -> list[str]:
    """Two steps per side from the same state; abort unless losses and new states agree."""
    results = {}
    for side in sides:
        state = copy_tree(initial_state)
        state, loss1 = side.compiled(state, images, labels)
        after_one = copy_tree(state[:2])  # the next step consumes `state`
        _, loss2 = side.compiled(state, images, labels)
        results[side.name] = (float(loss1), float(loss2), after_one)
    (b1, b2, b_tree), (f1, f2, f_tree) = (results[s.name] for s in sides)
    lines, failures = [], []
    for label, b, f in (("step 1 loss", b1, f1), ("step 2 loss", b2, f2)):
        err = abs(b - f) / max(1.0, abs(f))
        lines.append(f"{label}: bnjax {b:.6f}, flax {f:.6f} (diff {err:.1e})")
        if not err <= loss_tol:
            failures.append(f"{label}: bnjax {b:.6g} vs flax {f:.6g}, diff {err:.3g} > {loss_tol}")
    for name, b_part, f_part in (
        ("params", b_tree[0], f_tree[0]),
        ("batch_stats", b_tree[1], f_tree[1]),
    ):
        errs = jax.tree.leaves(jax.tree.map(normalized_max_diff, b_part, f_part))
        worst = max(errs)
        lines.append(f"{name} after step 1: max normalized diff {worst:.1e}")
        if not worst <= tree_tol:
            failures.append(f"{name} after step 1: max normalized diff {worst:.3g} > {tree_tol}")
    abort_if_disagreeing(failures, "bnjax and flax training steps")
    return lines


def time_interleaved(sides: Sequence[Side], images, labels, steps: int, warmup: int) -> None:
    for side in sides:
        for _ in range(warmup):
            side.step(images, labels)
    for r in range(steps):
        for i in range(len(sides)):
            side = sides[(i + r) % len(sides)]
            start = time.perf_counter()
            side.step(images, labels)
            side.times.append(time.perf_counter() - start)


def mem_mib(side: Side, field: str) -> float | None:
    value = getattr(side.memory, field, None) if side.memory is not None else None
    return None if value is None else value / MIB


def environment_lines(args) -> list[str]:
    device = jax.devices()[0]
    return [
        f"- jax {jax.__version__}, jaxlib {package_version('jaxlib')}, flax {flax.__version__}, "
        f"optax {optax.__version__}, bnjax {bnjax.__version__}, numpy {np.__version__}",
        f"- backend: {jax.default_backend()}, device: {device.device_kind} ({device}), "
        f"{jax.device_count()} device(s); host: {platform.machine()}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}",
        f"- ResNet-20, batch {args.batch_size}, compute dtype {args.dtype} (float32 params), "
        f"SGD lr {LEARNING_RATE} momentum {SGD_MOMENTUM}, {args.warmup} warm-up steps per side, "
        f"{args.steps} timed rounds (median), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per side (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="also write the Markdown report to this path")
    parser.add_argument("--dump_hlo", help="directory for the compiled HLO of both steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("need --batch_size >= 2, --steps >= 1 and --warmup >= 0")

    started = time.perf_counter()
    dtype = jnp.dtype(args.dtype)
    loss_tol, tree_tol = (1e-4, 1e-3) if dtype == jnp.float32 else (2e-2, 5e-2)
    k_init, k_x, k_y = jax.random.split(jax.random.key(args.seed), 3)
    images = jax.random.normal(k_x, (args.batch_size, *IMAGE_SHAPE), jnp.float32)
    labels = jax.random.randint(k_y, (args.batch_size,), 0, NUM_CLASSES)

    tx = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    sides = [
        Side("bnjax", models.resnet20(num_classes=NUM_CLASSES, norm="batch", dtype=dtype)),
        Side("flax", models.resnet20(num_classes=NUM_CLASSES, norm=nn.BatchNorm, dtype=dtype)),
    ]

    print(f"== ResNet-20, batch {args.batch_size}, {dtype.name}: init and compile", flush=True)
    b_vars = init_variables(sides[0].model, k_init, images)
    f_vars = init_variables(sides[1].model, k_init, images)
    check_same_variables(b_vars, f_vars)
    params, batch_stats = b_vars["params"], b_vars["batch_stats"]
    initial_state = (params, batch_stats, tx.init(params))
    for side in sides:
        t0 = time.perf_counter()
        # A fresh step function per side: jit caches traces by function, and a cached bnjax
        # trace would silently stand in for the flax one.
        step = make_train_step(side.model, tx)
        lowered = jax.jit(step, donate_argnums=0).lower(initial_state, images, labels)
        side.compiled = lowered.compile()
        side.memory = side.compiled.memory_analysis()
        side.hlo = side.compiled.as_text() or ""
        print(f"  {side.name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            path = os.path.join(args.dump_hlo, f"resnet20_{dtype.name}_{side.name}.hlo.txt")
            with open(path, "w") as f:
                f.write(side.hlo)

    if sides[0].hlo == sides[1].hlo:
        raise SystemExit("ABORT: both steps compiled to the same HLO: the norms are the same")
    check_lines = check_agreement(sides, images, labels, initial_state, loss_tol, tree_tol)
    for line in check_lines:
        print(f"  {line}", flush=True)
    print(f"  agree; timing {args.steps} interleaved rounds", flush=True)
    for side in sides:
        side.state = copy_tree(initial_state)
    time_interleaved(sides, images, labels, args.steps, args.warmup)
    final_losses = [float(side.step(images, labels)) for side in sides]

    b, f = sides
    b_temp, f_temp = mem_mib(b, "temp_size_in_bytes"), mem_mib(f, "temp_size_in_bytes")
    shape = "x".join(map(str, IMAGE_SHAPE))
    table = [
        "| shape | batch | bnjax ms | flax ms | time ratio | images/s (bnjax / flax) "
        "| bnjax temp MiB | flax temp MiB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {shape} | {args.batch_size} | {b.median_ms:.1f} | {f.median_ms:.1f} "
        f"| {fmt_ratio(b.median_ms, f.median_ms)} "
        f"| {args.batch_size / b.median_ms * 1e3:.0f} / {args.batch_size / f.median_ms * 1e3:.0f} "
        f"| {fmt_mib(b_temp)} | {fmt_mib(f_temp)} | {fmt_ratio(b_temp, f_temp)} |",
    ]
    detail = [
        "| BN | args MiB | out MiB | aliased MiB | temp MiB | kernels | min ms | median ms "
        "| max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        detail.append(
            f"| {side.name} | {fmt_mib(mem_mib(side, 'argument_size_in_bytes'))} "
            f"| {fmt_mib(mem_mib(side, 'output_size_in_bytes'))} "
            f"| {fmt_mib(mem_mib(side, 'alias_size_in_bytes'))} "
            f"| {fmt_mib(mem_mib(side, 'temp_size_in_bytes'))} "
            f"| {fusion_count(side.hlo)} | {1e3 * min(side.times):.1f} "
            f"| {side.median_ms:.1f} | {1e3 * max(side.times):.1f} |"
        )
    elapsed = time.perf_counter() - started
    report = [
        f"## ResNet-20 training step: bnjax BN vs flax.linen BN ({dtype.name})",
        "",
        *environment_lines(args),
        "",
        *table,
        "",
        "Ratios are bnjax / flax (lower is better for bnjax); a step is forward, loss, backward, "
        "batch_stats update and SGD-momentum update, jitted with the state donated; temp is "
        "XLA's scratch beyond arguments and outputs.",
        "",
        "Details (aliased = outputs written into the donated state's buffers; kernels = "
        "fusions, reductions and custom calls in the entry computation):",
        "",
        *detail,
        "",
        "Agreement before timing (same initial variables, same batch):",
        "",
        *(f"- {line}" for line in check_lines),
        f"- loss after all steps: bnjax {final_losses[0]:.4f}, flax {final_losses[1]:.4f}",
        "",
        f"Total benchmark time: {elapsed:.0f} s.",
    ]
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
