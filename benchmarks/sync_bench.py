"""Synchronised batch norm across devices: bnjax against flax.linen, in one process.

What is measured, side by side for ``bnjax.linen.BatchNorm`` and ``flax.linen.BatchNorm`` (both
at their defaults: momentum 0.99, epsilon 1e-5; flax with ``use_fast_variance=True``, its
one-pass E[x^2] - E[x]^2 variance), on a data-parallel mesh over all devices (8 virtual CPU
devices unless the machine has accelerators):

  layer     one batch-norm layer in training mode, forward and backward: jax.value_and_grad of
            loss = sum(y * cotangent) with respect to the parameters (scale, bias) and x, with
            the updated ``batch_stats`` returned as aux, on an NHWC input whose batch axis is
            split over the devices (``--layer_shape`` is the per-device shape).
  resnet20  one training step of ``bnjax.models.resnet20`` (21 batch-norm layers) with
            ``norm=functools.partial(<BatchNorm>, ...)``: forward, softmax cross-entropy,
            backward, gradient average, ``batch_stats`` update and SGD with momentum, state
            donated; the step is ``bnjax.train.steps.make_train_step``'s, as used for training.

each in two parallel modes:

  shard_map  ``jax.jit(jax.shard_map(...))``: each device runs the per-device program and the
             norms get ``axis_name="batch"`` (their statistics are reduced across devices).
  jit        plain ``jax.jit`` of the global computation with the batch sharded over the mesh
             (GSPMD); no ``axis_name``: the reduction over the sharded batch axis is global by
             construction, and XLA inserts the collectives.

The ResNet steps are compiled as ``bnjax.parallel.shard_map_step`` and ``jit_sharded_step``
compile them (same specs and shardings), but ahead of time here, so that the executables can be
asked for their memory and HLO.

How:

  * Every function is compiled ahead of time (``jax.jit(...).lower(...).compile()``). Memory is
    that executable's ``memory_analysis()`` (per device: an SPMD program is one program run on
    every device): argument + output + temp bytes ("n/a" where the backend gives none); temp is
    XLA's scratch beyond arguments and outputs. For the donated ResNet step, "aliased" (in the
    details) is the part of the output written into the arguments' buffers.
  * Collectives are counted in the compiled HLO text: all-reduce, all-gather, reduce-scatter,
    collective-permute and all-to-all, each also as its async ``-start`` form (the matching
    ``-done`` is not counted). They are the cross-device round trips per call: on a real
    interconnect their latency, not their few bytes of statistics, is the cost of sync BN.
  * Before timing, both sides run once from the same inputs (the ResNet sides from the same
    initial variables) and the maximum absolute differences of their results are reported:
    loss, gradients and updated statistics for the layer; the loss and the updated params and
    batch_stats after one step for ResNet-20. They differ slightly because flax's variance is
    one-pass; the run aborts only if a difference is not finite or exceeds 1e-2 (normalized by
    max(1, max|flax|)), in which case the two columns would not time the same computation.
  * Timing: ``--warmup`` untimed calls per side, then ``--repeats`` rounds (``--steps`` for
    ResNet-20); in each round bnjax and flax run once each, in an order alternating from round
    to round to spread drift evenly, each call timed to ``jax.block_until_ready``. The tables
    report medians and ratios bnjax / flax (lower is better for bnjax).
  * On virtual CPU devices the "devices" share the host's cores and the collectives are memory
    copies, so times measure compute overhead, not interconnect latency; the collective counts
    and memory are what carries over to real accelerators.

Exact commands (defaults: per-device layer input 32x16x16x64, ResNet-20 at 16 images per
device, 30 layer repeats, 8 ResNet rounds; about 2-3 minutes on 2 CPU cores; ``--quick``:
8x8x8x32, 4 images per device, about 1 minute):

    python benchmarks/sync_bench.py
    python benchmarks/sync_bench.py --quick --out sync.md
    python benchmarks/sync_bench.py --parts layer --layer_shape 64x32x32x128 --repeats 50

XLA_FLAGS gets ``--xla_force_host_platform_device_count=8`` unless it already sets a count; the
mesh uses every device JAX sees (``--devices`` to use fewer).

How to read it: ratios are bnjax / flax; below 1.00x bnjax is faster or smaller in that mode.
On 2 shared CPU cores, time ratios within about 10% of 1.00x are noise (compare min and max in
the details). The collectives column is the number of cross-device operations in one call:
under shard_map bnjax merges each layer's (count, shift, mean, m2) with one all-gather (an exact
merge of per-device moments) where flax takes one all-reduce of (E[x], E[x^2]); under jit the
partitioner places the collectives for both, and a two-pass variance (mean first, then the
centred second moment) needs a second reduction over the sharded batch where flax's one-pass
variance needs one. XLA may combine independent collectives of one kind into one operation
(a projection block's two norms, for example), so counts in a network are below the per-layer
sums. "collectives by kind" in the details says which operations they are.
"""

from __future__ import annotations

import os

_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COUNT_FLAG}=8".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import abort_if_disagreeing, emit_report, fmt_mib, fmt_ratio, package_version  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
from bnjax import linen as bnn  # noqa: E402
from bnjax import models  # noqa: E402
from bnjax.train import steps  # noqa: E402

AXIS = "batch"
MOMENTUM = 0.99
EPSILON = 1e-5
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
LEARNING_RATE = 0.1
SGD_MOMENTUM = 0.9
MIB = 2.0**20
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
MODES = ("shard_map", "jit")
PARTS = ("layer", "resnet20")
# A difference beyond this (normalized by max(1, max|flax|)) means the sides compute different
# things; one-pass vs two-pass variance stays far below it.
SANITY_TOLERANCE = 1e-2


def collective_counts(hlo: str) -> dict[str, int]:
    """Collective operations in compiled HLO text, by kind (async `-start` forms included)."""
    return {name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo)) for name in COLLECTIVES}


@dataclasses.dataclass
class Impl:
    """One side of a comparison: its executable, how to call it, and its timings."""

    name: str
    compiled: Any
    call: Callable[[], Any] = None
    times: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.memory = self.compiled.memory_analysis()
        self.hlo = self.compiled.as_text() or ""
        self.collectives = collective_counts(self.hlo)

    def __call__(self):
        return jax.block_until_ready(self.call())

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    def mem(self, field: str) -> float | None:
        value = getattr(self.memory, field, None) if self.memory is not None else None
        return None if value is None else value / MIB

    @property
    def total_mib(self) -> float | None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        parts = [self.mem(f) for f in fields]
        return None if any(p is None for p in parts) else sum(parts)

    @property
    def collective_total(self) -> int:
        return sum(self.collectives.values())


@dataclasses.dataclass
class Result:
    part: str
    mode: str
    sides: tuple[Impl, Impl]
    diffs: list[tuple[str, float]]


# ----------------------------------------------------------------------------- helpers


def make_mesh(num_devices: int | None):
    devices = jax.devices()[: num_devices or None]
    return jax.make_mesh((len(devices),), (AXIS,), (AxisType.Auto,), devices=devices)


def max_abs_diff(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    if a.shape != b.shape:
        raise SystemExit(f"ABORT: shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def tree_diff(a, b) -> tuple[float, float]:
    """(max abs difference, max normalized difference) over the leaves of two equal trees."""
    worst, worst_normalized = 0.0, 0.0
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        diff = max_abs_diff(leaf_a, leaf_b)
        scale = max(1.0, float(np.max(np.abs(np.asarray(leaf_b, np.float32)))))
        worst, worst_normalized = max(worst, diff), max(worst_normalized, diff / scale)
    if not np.isfinite(worst):
        return float("inf"), float("inf")
    return worst, worst_normalized


def check_diffs(tag: str, pairs) -> list[tuple[str, float]]:
    """[(label, max abs diff)] for (label, bnjax tree, flax tree) pairs; aborts on a mismatch."""
    out, failures = [], []
    for label, b, f in pairs:
        diff, normalized = tree_diff(b, f)
        out.append((label, diff))
        if not normalized <= SANITY_TOLERANCE:
            failures.append(f"{label}: normalized max diff {normalized:.3g}")
    abort_if_disagreeing(failures, f"bnjax and flax on {tag}")
    return out


def time_interleaved(impls: Sequence[Impl], repeats: int, warmup: int) -> None:
    for impl in impls:
        for _ in range(warmup):
            impl()
    for r in range(repeats):
        for i in range(len(impls)):
            impl = impls[(i + r) % len(impls)]
            start = time.perf_counter()
            impl()
            impl.times.append(time.perf_counter() - start)


def dump(dump_dir: str | None, tag: str, impls: Sequence[Impl]) -> None:
    if not dump_dir:
        return
    os.makedirs(dump_dir, exist_ok=True)
    for impl in impls:
        with open(os.path.join(dump_dir, f"{tag}_{impl.name}.hlo.txt"), "w") as handle:
            handle.write(impl.hlo)


# ----------------------------------------------------------------------------- one layer


def layer_case(mesh, mode: str, shape, key) -> tuple[list[Impl], Callable]:
    """bnjax and flax BatchNorm, fwd+bwd, on a global batch of mesh.size * shape[0] rows."""
    channels = shape[-1]
    global_shape = (mesh.size * shape[0], *shape[1:])
    k_x, k_ct, k_s, k_b = jax.random.split(key, 4)
    batch_sharding = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())
    # Mean 1, std 2: off-centre enough to exercise the mean, tame for flax's E[x^2]-E[x]^2.
    x = 1.0 + 2.0 * jax.random.normal(k_x, global_shape, jnp.float32)
    ct = jax.random.normal(k_ct, global_shape, jnp.float32)
    x, ct = jax.device_put((x, ct), batch_sharding)
    params = {
        "scale": 1.0 + 0.1 * jax.random.normal(k_s, (channels,), jnp.float32),
        "bias": 0.1 * jax.random.normal(k_b, (channels,), jnp.float32),
    }
    batch_stats = {"mean": jnp.zeros((channels,)), "var": jnp.ones((channels,))}
    params, batch_stats = jax.device_put((params, batch_stats), replicated)
    axis_name = AXIS if mode == "shard_map" else None

    impls = []
    for name, cls in (("bnjax", bnn.BatchNorm), ("flax", nn.BatchNorm)):
        module = cls(
            use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name
        )

        def loss(params, x, batch_stats, ct, module=module):
            y, updates = module.apply(
                {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y * ct), updates["batch_stats"]

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

        if mode == "shard_map":

            def per_device(params, x, batch_stats, ct, grad_fn=grad_fn):
                # The gradient of a replicated parameter comes out summed over devices
                # (autodiff under shard_map), so only the loss needs a psum.
                (value, stats), grads = grad_fn(params, x, batch_stats, ct)
                return (jax.lax.psum(value, AXIS), stats), grads

            fn = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P(AXIS), P(), P(AXIS)),
                out_specs=((P(), P()), (P(), P(AXIS))),
            )
        else:
            fn = grad_fn
        args = (params, x, batch_stats, ct)
        compiled = jax.jit(fn).lower(*args).compile()
        impls.append(Impl(name, compiled, functools.partial(compiled, *args)))

    def compare(b, f):
        (b_loss, b_stats), (b_dparams, b_dx) = b
        (f_loss, f_stats), (f_dparams, f_dx) = f
        return [
            ("loss", b_loss, f_loss),
            ("dx", b_dx, f_dx),
            ("dscale", b_dparams["scale"], f_dparams["scale"]),
            ("dbias", b_dparams["bias"], f_dparams["bias"]),
            ("running mean", b_stats["mean"], f_stats["mean"]),
            ("running var", b_stats["var"], f_stats["var"]),
        ]

    return impls, compare


# ----------------------------------------------------------------------------- ResNet-20


@dataclasses.dataclass
class StepSide:
    """A donated training step and its own chain of states."""

    compiled: Any
    batch: Any
    state: Any = None

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics["loss"]


def resnet_case(mesh, mode: str, per_device_batch: int, key) -> tuple[list[Impl], Callable]:
    """ResNet-20 training steps (bnjax.train.steps.make_train_step) with each BatchNorm."""
    k_x, k_y = jax.random.split(key)
    global_batch = mesh.size * per_device_batch
    batch = {
        "image": jax.random.normal(k_x, (global_batch, *IMAGE_SHAPE), jnp.float32),
        "label": jax.random.randint(k_y, (global_batch,), 0, NUM_CLASSES),
    }
    batch_sharding = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())
    batch = jax.device_put(batch, batch_sharding)
    optimizer = optax.sgd(LEARNING_RATE, momentum=SGD_MOMENTUM)
    axis_name = AXIS if mode == "shard_map" else None

    # The same initial variables for both sides (bnjax's; flax's must be identical). Init runs
    # in evaluation mode, so the models without `axis_name` give the same variables.
    initial_vars = {}
    for name, cls in (("bnjax", bnn.BatchNorm), ("flax", nn.BatchNorm)):
        plain = models.resnet20(num_classes=NUM_CLASSES, norm=functools.partial(cls))
        initial_vars[name] = steps.initial_state(plain, optimizer, batch["image"][:2], 0)
    b_init, f_init = initial_vars["bnjax"], initial_vars["flax"]
    if jax.tree.structure(b_init) != jax.tree.structure(f_init) or tree_diff(b_init, f_init)[0]:
        raise SystemExit("ABORT: bnjax and flax ResNet-20 initial variables differ")
    initial = jax.device_put(b_init, replicated)

    sides = []
    for name, cls in (("bnjax", bnn.BatchNorm), ("flax", nn.BatchNorm)):
        norm = functools.partial(cls, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name)
        model = models.resnet20(num_classes=NUM_CLASSES, norm=norm)
        # A fresh step function per side: jit caches traces by function.
        train_step = steps.make_train_step(model, optimizer)
        if mode == "shard_map":
            fn = jax.shard_map(
                lambda state, batch, train_step=train_step: train_step(state, batch, AXIS),
                mesh=mesh,
                in_specs=(P(), P(AXIS)),
                out_specs=(P(), P()),
            )
        else:
            fn = lambda state, batch, train_step=train_step: train_step(state, batch, None)  # noqa: E731
        jitted = jax.jit(
            fn,
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        compiled = jitted.lower(initial, batch).compile()
        print(f"    {name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        sides.append(Impl(name, compiled, StepSide(compiled, batch)))

    def copy_initial():
        return jax.tree.map(jnp.copy, initial)

    def run_once(impl: Impl):
        state, metrics = impl.compiled(copy_initial(), batch)
        return metrics["loss"], state["params"], state["batch_stats"]

    def compare(b, f):
        return [
            ("step loss", b[0], f[0]),
            ("params after 1 step", b[1], f[1]),
            ("batch_stats after 1 step", b[2], f[2]),
        ]

    for impl in sides:
        impl.call.state = copy_initial()
    return sides, (run_once, compare)


# ----------------------------------------------------------------------------- reporting


def environment_lines(args, mesh) -> list[str]:
    device = mesh.devices.flat[0]
    return [
        f"- jax {jax.__version__}, jaxlib {package_version('jaxlib')}, flax {flax.__version__}, "
        f"optax {optax.__version__}, bnjax {bnjax.__version__}, numpy {np.__version__}",
        f"- backend: {jax.default_backend()}, device: {device.device_kind} ({device}), mesh "
        f"{dict(mesh.shape)} of {jax.device_count()} device(s); host: {platform.machine()}, "
        f"{os.cpu_count()} CPU(s), Python {platform.python_version()}",
        f"- float32; layer: per-device input {'x'.join(map(str, args.layer_shape))}, "
        f"{args.repeats} timed rounds; ResNet-20: {args.resnet_batch} images per device "
        f"(global {mesh.size * args.resnet_batch}), SGD lr {LEARNING_RATE} momentum "
        f"{SGD_MOMENTUM}, {args.steps} timed rounds; {args.warmup} warm-up calls per side; "
        f"medians",
        f"- XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    ]


def part_label(part: str) -> str:
    return "BN layer fwd+bwd" if part == "layer" else "ResNet-20 train step"


def main_table(results: Sequence[Result]) -> list[str]:
    lines = [
        "| case | mode | bnjax ms | flax ms | time ratio | bnjax MiB | flax MiB | memory ratio "
        "| collectives (bnjax / flax) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b, f = r.sides
        lines.append(
            f"| {part_label(r.part)} | {r.mode} | {b.median_ms:.2f} | {f.median_ms:.2f} "
            f"| {fmt_ratio(b.median_ms, f.median_ms)} | {fmt_mib(b.total_mib)} "
            f"| {fmt_mib(f.total_mib)} | {fmt_ratio(b.total_mib, f.total_mib)} "
            f"| {b.collective_total} / {f.collective_total} |"
        )
    return lines


def detail_table(results: Sequence[Result]) -> list[str]:
    lines = [
        "| case | mode | BN | args MiB | out MiB | aliased MiB | temp MiB | min ms | median ms "
        "| max ms | collectives by kind |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for impl in r.sides:
            kinds = ", ".join(f"{k} {n}" for k, n in impl.collectives.items() if n) or "none"
            lines.append(
                f"| {part_label(r.part)} | {r.mode} | {impl.name} "
                f"| {fmt_mib(impl.mem('argument_size_in_bytes'))} "
                f"| {fmt_mib(impl.mem('output_size_in_bytes'))} "
                f"| {fmt_mib(impl.mem('alias_size_in_bytes'))} "
                f"| {fmt_mib(impl.mem('temp_size_in_bytes'))} "
                f"| {1e3 * min(impl.times):.2f} | {impl.median_ms:.2f} "
                f"| {1e3 * max(impl.times):.2f} | {kinds} |"
            )
    return lines


def sanity_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        text = ", ".join(f"{label} {diff:.1e}" for label, diff in r.diffs)
        lines.append(f"- {part_label(r.part)}, {r.mode}: {text}")
    return lines


# ----------------------------------------------------------------------------- main


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shape must look like 32x16x16x64: {text!r}") from error
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"need a positive NHWC shape, got {text!r}")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layer_shape",
        type=parse_shape,
        default=None,
        help="per-device NHWC input of the layer case (default 32x16x16x64; --quick 8x8x8x32)",
    )
    parser.add_argument(
        "--resnet_batch", type=int, default=None, help="ResNet-20 images per device (16; 4)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="layer timed rounds (30; 10)")
    parser.add_argument("--steps", type=int, default=None, help="ResNet timed rounds (8; 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--devices", type=int, default=None, help="mesh size (default: all)")
    parser.add_argument("--out", help="also write the Markdown report to this path")
    parser.add_argument("--dump_hlo", help="directory for the compiled HLO of every function")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = ((8, 8, 8, 32), 4, 10, 3) if args.quick else ((32, 16, 16, 64), 16, 30, 8)
    fields = ("layer_shape", "resnet_batch", "repeats", "steps")
    for field, default in zip(fields, defaults, strict=True):
        if getattr(args, field) is None:
            setattr(args, field, default)
    if args.resnet_batch < 1 or args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("need --resnet_batch, --repeats, --steps >= 1 and --warmup >= 0")
    if args.devices is not None and not 1 <= args.devices <= jax.device_count():
        parser.error(f"--devices must be in 1..{jax.device_count()}")

    started = time.perf_counter()
    mesh = make_mesh(args.devices)
    key = jax.random.key(args.seed)
    results = []
    for part in args.parts:
        for mode in args.modes:
            key, k_case = jax.random.split(key)
            print(f"== {part_label(part)}, {mode}, {mesh.size} devices", flush=True)
            if part == "layer":
                impls, compare = layer_case(mesh, mode, args.layer_shape, k_case)
                b_out, f_out = impls[0](), impls[1]()
            else:
                impls, (run_once, compare) = resnet_case(mesh, mode, args.resnet_batch, k_case)
                b_out, f_out = run_once(impls[0]), run_once(impls[1])
            if impls[0].hlo == impls[1].hlo:
                raise SystemExit("ABORT: both sides compiled to the same HLO")
            diffs = check_diffs(f"{part} {mode}", compare(b_out, f_out))
            print(
                "  max abs diff: " + ", ".join(f"{label} {d:.1e}" for label, d in diffs),
                flush=True,
            )
            rounds = args.repeats if part == "layer" else args.steps
            time_interleaved(impls, rounds, args.warmup)
            dump(args.dump_hlo, f"{part}_{mode}", impls)
            result = Result(part, mode, tuple(impls), diffs)
            results.append(result)
            print("  " + main_table([result])[-1], flush=True)

    elapsed = time.perf_counter() - started
    report = [
        f"## Synchronised batch norm on {mesh.size} devices: bnjax vs flax.linen (float32)",
        "",
        *environment_lines(args, mesh),
        "",
        *main_table(results),
        "",
        "Ratios are bnjax / flax (lower is better for bnjax). MiB = argument + output + temp "
        "bytes of the compiled program, per device; collectives = all-reduce, all-gather, "
        "reduce-scatter, collective-permute and all-to-all operations (async starts included) "
        "in the compiled HLO of one call. shard_map: norms with `axis_name`; jit: batch "
        "sharded over the mesh, no `axis_name` (GSPMD).",
        "",
        "Details (aliased = outputs written into donated argument buffers):",
        "",
        *detail_table(results),
        "",
        "Max abs difference bnjax - flax before timing (flax's variance is one-pass):",
        "",
        *sanity_lines(results),
        "",
        f"Total benchmark time: {elapsed:.0f} s.",
    ]
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
