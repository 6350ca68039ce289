"""Speed and compiled memory of bnjax's normalizers against flax.linen, in one process.

What is measured, per input shape (NHWC, channels last) and dtype:

  bn train fwd      batch norm in training mode: y and the updated running statistics.
  bn train fwd+bwd  jit of jax.value_and_grad of loss = sum(y * cotangent) with respect to x,
                    scale and bias; the running-statistics update is returned as aux, so
                    neither side can drop it.
  bn eval fwd       batch norm with the running statistics.
  gn fwd            group norm, 32 groups.
  ln fwd            layer norm over the last axis.
  cbn conv fwd+bwd  cross-iteration batch norm fused with a 3x3 conv C -> C (window 4, full),
                    on the first 8 examples: value_and_grad of sum(y * cotangent) w.r.t. x,
                    the kernel, scale and bias, the new state as aux. Its reference (the
                    "flax" column) is a plain jnp implementation of the paper's formulas
                    (raw second moments, max(nu, mu^2), nu_bar - mu_bar^2); flax has no CBN.

  ws conv fwd+bwd   a 3x3 conv (C -> C channels, no bias) with a weight-standardized kernel:
                    jit of jax.value_and_grad of sum(y * cotangent) with respect to x and the
                    stored kernel. bnjax.linen.StandardizedConv against the same formula in
                    plain jnp (mean, var, rsqrt) followed by lax.conv_general_dilated (the
                    "flax" column of this row). Only with ``--ops ws_conv``: the conv's
                    compute takes minutes on a small CPU.
  frn + tlu fwd     filter response normalization with its TLU (epsilon 1e-6).
  evonorm-b0 train  EvoNorm-B0 in training mode: y and the updated running variance.
  evonorm-s0 fwd    EvoNorm-S0, 32 groups.

flax has no FRN or EvoNorm: their "flax" column is a plain jnp transcription of the same
formula (float32 statistics with jnp.mean / jnp.var, no fusion tricks), named "jnp" in the
details table.

bnjax (``bnjax.batch_norm``, ``bnjax.group_norm``, ``bnjax.layer_norm``) is compared with the
flax.linen modules at their defaults: ``BatchNorm(momentum=0.99, epsilon=1e-5)``,
``GroupNorm(num_groups=32)``, ``LayerNorm()`` (bnjax gets the same epsilon). For a non-float32
``--dtype`` the flax modules get ``dtype=<that dtype>`` so both sides return the input dtype.

How:

  * Every function is compiled ahead of time (``jax.jit(f).lower(*args).compile()``), and that
    executable is both timed and asked for ``memory_analysis()``: ``temp_size_in_bytes`` is the
    scratch XLA allocates beyond arguments and outputs (full-size temporaries such as saved
    residuals show up there; one that XLA places in an output's buffer before the output is
    written does not, so ``--dump_hlo`` is the way to count full-size passes).
  * Before anything is timed, bnjax and flax are run once and their outputs compared (y,
    running mean and variance, loss and gradients): the run aborts if the normalized maximum
    difference ``max|a - b| / max(1, max|b|)`` exceeds 1e-3 (2e-2 for 16-bit dtypes), so the two
    columns always time the same computation.
  * Timing: warm-up calls, then ``--repeats`` rounds; in each round bnjax, flax (and torch, when
    present) and a jitted ``x * 2`` each run once, in an order rotated from round to round to
    spread drift evenly. Each call is timed to ``jax.block_until_ready``; the table reports
    medians. "x copy" divides each median by the median of ``x * 2`` on the same array (one
    read and one write of x: the memory-bandwidth floor of an elementwise op).
  * If ``import torch`` works, batch norm is also timed with
    ``torch.nn.functional.batch_norm`` on a channels-last tensor (float32 only) and shown in a
    second table; without torch that part is skipped.

Exact command (defaults: shapes 128x32x32x64 and 32x56x56x128, float32, 30 repeats, every op
but ws_conv; ``--ops`` picks ops, ``--no_torch`` skips PyTorch; about 40 s on 2 CPU cores):

    python benchmarks/norm_bench.py
    python benchmarks/norm_bench.py --repeats 50 --shapes 128x32x32x64 --dtype bfloat16 \
        --out bench.md --dump_hlo /tmp/hlo
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from common import (
    abort_if_disagreeing,
    emit_report,
    fmt_mib,
    fmt_ratio,
    fusion_count,
    package_version,
)

import bnjax
import bnjax.linen

MOMENTUM = 0.99
BN_EPSILON = 1e-5
GN_GROUPS = 32
MABN_WINDOW = 16
MIB = 2.0**20
OPS = (
    "bn_train",
    "bn_train_grad",
    "bn_eval",
    "gn",
    "ln",
    "ws_conv",
    "mabn_train_grad",
    "domain_bn_train_grad",
    "frn",
    "evonorm_b0",
    "evonorm_s0",
    "cbn_train_grad",
)
# A conv's compute dwarfs a norm's: ws_conv (minutes on 2 CPU cores) runs when asked for.
DEFAULT_OPS = tuple(op for op in OPS if op != "ws_conv")
OP_LABELS = {
    "bn_train": "bn train fwd",
    "bn_train_grad": "bn train fwd+bwd",
    "bn_eval": "bn eval fwd",
    "gn": f"gn fwd ({GN_GROUPS} groups)",
    "ln": "ln fwd (last axis)",
    "ws_conv": "ws conv fwd+bwd (3x3)",
    "mabn_train_grad": f"mabn train fwd+bwd, window {MABN_WINDOW} (vs plain jnp)",
    "domain_bn_train_grad": "domain bn train fwd+bwd (2 domains; vs plain jnp, not flax)",
    "frn": "frn + tlu fwd",
    "evonorm_b0": "evonorm-b0 train fwd",
    "evonorm_s0": f"evonorm-s0 fwd ({GN_GROUPS} groups)",
    "cbn_train_grad": "cbn conv fwd+bwd (vs plain jnp)",
}
CBN_WINDOW = 4
NUM_DOMAINS = 2
DEFAULT_SHAPES = ("128x32x32x64", "32x56x56x128")


@dataclasses.dataclass
class Impl:
    """One side of a comparison: a function, its arguments, and (for jax) its executable."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    compiled: Any = None
    memory: Any = None
    hlo: str = ""
    times: list[float] = dataclasses.field(default_factory=list)

    def __call__(self):
        if self.compiled is not None:
            return jax.block_until_ready(self.compiled(*self.args))
        return self.fn(*self.args)  # torch: synchronous on CPU

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)


@dataclasses.dataclass
class Case:
    op: str
    impls: list[Impl]
    # (label, bnjax value, reference value) triples from the outputs of impls[0] and impls[1].
    compare: Callable[[Any, Any], list[tuple[str, Any, Any]]]


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"shape must look like 128x32x32x64, got {text!r}"
        ) from error
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs >= 2 positive dims, got {text!r}")
    return shape


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def compile_impl(impl: Impl, dump_dir: str | None, tag: str) -> None:
    compiled = jax.jit(impl.fn).lower(*impl.args).compile()
    impl.compiled = compiled
    impl.memory = compiled.memory_analysis()
    impl.hlo = compiled.as_text() or ""
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{tag}_{impl.name}.hlo.txt"), "w") as f:
            f.write(impl.hlo)


def mem_field(impl: Impl, field: str) -> float | None:
    if impl.memory is None:
        return None
    value = getattr(impl.memory, field, None)
    return None if value is None else value / MIB


# ----------------------------------------------------------------------------- cases


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().float().cpu().numpy()
    return np.asarray(
        jnp.asarray(value, jnp.float32) if not isinstance(value, np.ndarray) else value
    )


def flax_dtype(dtype):
    return None if jnp.dtype(dtype) == jnp.float32 else dtype


def build_cases(shape, dtype, ops, key) -> list[Case]:
    channels = shape[-1]
    k_x, k_ct, k_s, k_b, k_m, k_v = jax.random.split(key, 6)
    # Mean 1, std 2: off-centre enough to exercise the mean, tame enough for flax's E[x^2]-E[x]^2.
    x = (1.0 + 2.0 * jax.random.normal(k_x, shape, jnp.float32)).astype(dtype)
    ct = jax.random.normal(k_ct, shape, jnp.float32).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k_s, (channels,), jnp.float32)
    bias = 0.1 * jax.random.normal(k_b, (channels,), jnp.float32)
    run_mean = 0.5 * jax.random.normal(k_m, (channels,), jnp.float32)
    run_var = jax.random.uniform(k_v, (channels,), jnp.float32, 0.5, 2.0)
    state = bnjax.batch_norm_state(channels)._replace(mean=run_mean, var=run_var)
    params = {"scale": scale, "bias": bias}
    batch_stats = {"mean": run_mean, "var": run_var}
    fdt = flax_dtype(dtype)
    cases = []

    bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=BN_EPSILON, dtype=fdt)

    def bn_stats_pairs(b_state, f_stats):
        return [
            ("running mean", b_state.mean, f_stats["mean"]),
            ("running var", b_state.var, f_stats["var"]),
        ]

    if "bn_train" in ops:

        def bnjax_train(x, state, scale, bias):
            return bnjax.batch_norm(
                x, state, scale, bias, training=True, momentum=MOMENTUM, epsilon=BN_EPSILON
            )

        def flax_train(variables, x):
            y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            return y, updates["batch_stats"]

        cases.append(
            Case(
                "bn_train",
                [
                    Impl("bnjax", bnjax_train, (x, state, scale, bias)),
                    Impl("flax", flax_train, ({"params": params, "batch_stats": batch_stats}, x)),
                ],
                lambda b, f: [("y", b[0], f[0]), *bn_stats_pairs(b[1], f[1])],
            )
        )

    if "bn_train_grad" in ops:

        def bnjax_loss(x, scale, bias, state, ct):
            y, new_state = bnjax.batch_norm(
                x, state, scale, bias, training=True, momentum=MOMENTUM, epsilon=BN_EPSILON
            )
            return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), new_state

        def flax_loss(params, x, batch_stats, ct):
            y, updates = bn.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            loss = jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))
            return loss, updates["batch_stats"]

        bnjax_grad = jax.value_and_grad(bnjax_loss, argnums=(0, 1, 2), has_aux=True)
        flax_grad = jax.value_and_grad(flax_loss, argnums=(0, 1), has_aux=True)

        def grad_pairs(b, f):
            (b_loss, b_state), (b_dx, b_dscale, b_dbias) = b
            (f_loss, f_stats), (f_dparams, f_dx) = f
            return [
                ("loss", b_loss, f_loss),
                *bn_stats_pairs(b_state, f_stats),
                ("dx", b_dx, f_dx),
                ("dscale", b_dscale, f_dparams["scale"]),
                ("dbias", b_dbias, f_dparams["bias"]),
            ]

        cases.append(
            Case(
                "bn_train_grad",
                [
                    Impl("bnjax", bnjax_grad, (x, scale, bias, state, ct)),
                    Impl("flax", flax_grad, (params, x, batch_stats, ct)),
                ],
                grad_pairs,
            )
        )

    if "bn_eval" in ops:

        def bnjax_eval(x, state, scale, bias):
            return bnjax.batch_norm(x, state, scale, bias, training=False, epsilon=BN_EPSILON)

        def flax_eval(variables, x):
            return bn.apply(variables, x, use_running_average=True)

        cases.append(
            Case(
                "bn_eval",
                [
                    Impl("bnjax", bnjax_eval, (x, state, scale, bias)),
                    Impl("flax", flax_eval, ({"params": params, "batch_stats": batch_stats}, x)),
                ],
                lambda b, f: [("y", b[0], f), *bn_stats_pairs(b[1], batch_stats)],
            )
        )

    if "gn" in ops:
        gn = nn.GroupNorm(num_groups=GN_GROUPS, dtype=fdt)
        if channels % GN_GROUPS:
            print(
                f"  skipping gn for {shape_label(shape)}: {channels} channels, {GN_GROUPS} groups"
            )
        else:

            def bnjax_gn(x, scale, bias):
                return bnjax.group_norm(x, scale, bias, num_groups=GN_GROUPS, epsilon=gn.epsilon)

            def flax_gn(params, x):
                return gn.apply({"params": params}, x)

            cases.append(
                Case(
                    "gn",
                    [
                        Impl("bnjax", bnjax_gn, (x, scale, bias)),
                        Impl("flax", flax_gn, (params, x)),
                    ],
                    lambda b, f: [("y", b, f)],
                )
            )

    if "ln" in ops:
        ln = nn.LayerNorm(dtype=fdt)

        def bnjax_ln(x, scale, bias):
            return bnjax.layer_norm(x, scale, bias, epsilon=ln.epsilon)

        def flax_ln(params, x):
            return ln.apply({"params": params}, x)

        cases.append(
            Case(
                "ln",
                [Impl("bnjax", bnjax_ln, (x, scale, bias)), Impl("flax", flax_ln, (params, x))],
                lambda b, f: [("y", b, f)],
            )
        )
    if "ws_conv" in ops:
        cases.append(ws_conv_case(x, ct, fdt, k_m))
    if "mabn_train_grad" in ops:
        cases.append(moving_average_case(x, ct, scale, bias, key))
    if "domain_bn_train_grad" in ops:
        cases.append(domain_batch_norm_case(x, ct, scale, bias))
    cases.extend(norm_activation_cases(x, scale, bias, dtype, ops))
    if "cbn_train_grad" in ops:
        cases.append(cross_iteration_case(x[:8], ct[:8], scale, bias, key))
    return cases


def norm_activation_cases(x, scale, bias, dtype, ops) -> list[Case]:
    """FRN + TLU, EvoNorm-B0 (training), EvoNorm-S0 against plain jnp versions of the same
    formulas (flax has none); the second per-channel parameter (tau, v) is `bias` - 0.5."""
    second = bias - 0.5
    cases = []

    def f32(a):
        return a.astype(jnp.float32)

    if "frn" in ops:

        def jnp_frn(x, scale, bias, tau):
            nu2 = jnp.mean(jnp.square(f32(x)), axis=(1, 2), keepdims=True)
            y = f32(x) * jax.lax.rsqrt(nu2 + 1e-6) * scale + bias
            return jnp.maximum(y, tau).astype(x.dtype)

        cases.append(
            Case(
                "frn",
                [
                    Impl("bnjax", bnjax.filter_response_norm, (x, scale, bias, second)),
                    Impl("jnp", jnp_frn, (x, scale, bias, second)),
                ],
                lambda b, f: [("y", b, f)],
            )
        )
    if "evonorm_b0" in ops:
        state = bnjax.evonorm_b0_state(x.shape[-1])

        def bnjax_b0(x, state, scale, bias, v):
            return bnjax.evonorm_b0(x, state, scale, bias, v, training=True, momentum=MOMENTUM)

        def jnp_b0(x, running_var, scale, bias, v):
            batch_var = jnp.var(f32(x), axis=(0, 1, 2))
            instance_var = jnp.var(f32(x), axis=(1, 2), keepdims=True)
            denominator = jnp.maximum(
                jnp.sqrt(batch_var + BN_EPSILON), v * f32(x) + jnp.sqrt(instance_var + BN_EPSILON)
            )
            y = (f32(x) / denominator * scale + bias).astype(x.dtype)
            return y, MOMENTUM * running_var + (1 - MOMENTUM) * batch_var

        cases.append(
            Case(
                "evonorm_b0",
                [
                    Impl("bnjax", bnjax_b0, (x, state, scale, bias, second)),
                    Impl("jnp", jnp_b0, (x, state.var, scale, bias, second)),
                ],
                lambda b, f: [("y", b[0], f[0]), ("running var", b[1].var, f[1])],
            )
        )
    if "evonorm_s0" in ops and x.shape[-1] % GN_GROUPS == 0:

        def bnjax_s0(x, scale, bias, v):
            return bnjax.evonorm_s0(x, scale, bias, v, num_groups=GN_GROUPS)

        def jnp_s0(x, scale, bias, v):
            n, h, w, c = x.shape
            grouped = f32(x).reshape(n, h, w, GN_GROUPS, c // GN_GROUPS)
            var = jnp.var(grouped, axis=(1, 2, 4), keepdims=True)
            std = jnp.broadcast_to(jnp.sqrt(var + BN_EPSILON), grouped.shape).reshape(x.shape)
            y = f32(x) * jax.nn.sigmoid(v * f32(x)) / std * scale + bias
            return y.astype(x.dtype)

        cases.append(
            Case(
                "evonorm_s0",
                [
                    Impl("bnjax", bnjax_s0, (x, scale, bias, second)),
                    Impl("jnp", jnp_s0, (x, scale, bias, second)),
                ],
                lambda b, f: [("y", b, f)],
            )
        )
    return cases


def ws_conv_case(x, ct, fdt, key) -> Case:
    """bnjax.linen.StandardizedConv against plain jnp standardization + lax.conv, fwd+bwd."""
    channels = x.shape[-1]
    kernel = jax.random.normal(key, (3, 3, channels, channels), jnp.float32) / (3 * channels**0.5)
    conv = bnjax.linen.StandardizedConv(channels, (3, 3), use_bias=False, dtype=fdt)

    def bnjax_loss(x, kernel, ct):
        y = conv.apply({"params": {"kernel": kernel}}, x)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    def plain_loss(x, kernel, ct):
        mean = jnp.mean(kernel, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2))
        standardized = ((kernel - mean) * jax.lax.rsqrt(var + 1e-5)).astype(x.dtype)
        y = jax.lax.conv_general_dilated(
            x, standardized, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    def pairs(b, f):
        (b_loss, (b_dx, b_dk)), (f_loss, (f_dx, f_dk)) = b, f
        return [("loss", b_loss, f_loss), ("dx", b_dx, f_dx), ("dkernel", b_dk, f_dk)]

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    return Case(
        "ws_conv",
        [
            Impl("bnjax", grad(bnjax_loss), (x, kernel, ct)),
            Impl("plain", grad(plain_loss), (x, kernel, ct)),
        ],
        pairs,
    )


def moving_average_case(x, ct, scale, bias, key) -> Case:
    """Moving average batch norm (reduced form, full history, no renormalization yet), forward
    and backward with the probe, against the same formula written out in plain jnp."""
    channels = x.shape[-1]
    fresh = bnjax.moving_average_batch_norm_state(channels, window=MABN_WINDOW)
    k_var, k_psi = jax.random.split(key)
    history = (MABN_WINDOW - 1, channels)
    state = fresh._replace(
        var_history=jax.random.uniform(k_var, history, jnp.float32, 3.0, 6.0),
        grad_scaled_history=0.01 * jax.random.normal(k_psi, history, jnp.float32),
        count=jnp.asarray(MABN_WINDOW, jnp.int32),
        backward_count=jnp.asarray(MABN_WINDOW, jnp.int32),
    )
    probe = bnjax.moving_average_batch_norm_probe(state)

    def bnjax_loss(x, scale, bias, probe, state, ct):
        y, new_state = bnjax.moving_average_batch_norm(
            x, state, scale, bias, probe, training=True, epsilon=BN_EPSILON
        )
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), new_state

    bnjax_grad = jax.value_and_grad(bnjax_loss, argnums=(0, 1, 2, 3), has_aux=True)

    def plain_grad(x, scale, bias, probe, state, ct):
        del probe
        axes = tuple(range(x.ndim - 1))
        xf, ctf = x.astype(jnp.float32), ct.astype(jnp.float32)
        chi = jnp.mean(xf * xf, axis=axes)
        chi_bar = (chi + state.var_history.sum(0)) / MABN_WINDOW
        inv = jax.lax.rsqrt(chi_bar + BN_EPSILON)
        x_hat = xf * inv
        loss = jnp.sum((x_hat * scale + bias) * ctf)
        grad = ctf * scale
        psi = jnp.mean(grad * x_hat, axis=axes)
        psi_bar = (psi + state.grad_scaled_history.sum(0)) / MABN_WINDOW
        dx = (inv * (grad - x_hat * psi_bar)).astype(x.dtype)
        slot = state.count % (MABN_WINDOW - 1)
        new_state = state._replace(
            var=0.98 * state.var + 0.02 * chi_bar,
            var_history=state.var_history.at[slot].set(chi),
            count=state.count + 1,
        )
        grads = (dx, jnp.sum(ctf * x_hat, axis=axes), jnp.sum(ctf, axis=axes))
        return (loss, new_state), (*grads, jnp.stack([jnp.zeros_like(psi), psi]))

    def pairs(b, f):
        (b_loss, b_state), b_grads = b
        (f_loss, f_state), f_grads = f
        names = ("dx", "dscale", "dbias", "probe grad (g, psi)")
        return [
            ("loss", b_loss, f_loss),
            ("running var", b_state.var, f_state.var),
            ("var history", b_state.var_history, f_state.var_history),
            *((n, bg, fg) for n, bg, fg in zip(names, b_grads, f_grads, strict=True)),
        ]

    args = (x, scale, bias, probe, state, ct)
    return Case(
        "mabn_train_grad",
        [Impl("bnjax", bnjax_grad, args), Impl("plain jnp", plain_grad, args)],
        pairs,
    )


def domain_batch_norm_case(x, ct, scale, bias) -> Case:
    """bnjax.domain_batch_norm (per-domain affine) against the same formula in plain jnp: one
    masked two-pass reduction and one normalization per domain, autodiff for the gradient.
    Flax has no domain batch norm, so the second column is that plain version."""
    channels = x.shape[-1]
    domain = jnp.arange(x.shape[0], dtype=jnp.int32) % NUM_DOMAINS  # mixed in every batch
    scales = jnp.stack([scale, 2.0 - scale])
    biases = jnp.stack([bias, -bias])
    state = bnjax.domain_batch_norm_state(NUM_DOMAINS, channels)
    axes = tuple(range(x.ndim - 1))

    def bnjax_loss(x, scales, biases, state, ct):
        y, new_state = bnjax.domain_batch_norm(
            x,
            state,
            scales,
            biases,
            domain=domain,
            training=True,
            momentum=MOMENTUM,
            epsilon=BN_EPSILON,
        )
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), (
            new_state.mean,
            new_state.var,
        )

    def plain_loss(x, scales, biases, state, ct):
        values = x.astype(jnp.float32)
        y = jnp.zeros_like(values)
        means, variances = [], []
        for d in range(NUM_DOMAINS):
            member = (domain == d).reshape((-1,) + (1,) * (x.ndim - 1))
            count = jnp.sum(member) * (values.size // (x.shape[0] * channels))
            mean = jnp.sum(jnp.where(member, values, 0.0), axes) / count
            var = jnp.sum(jnp.where(member, jnp.square(values - mean), 0.0), axes) / count
            y_d = (values - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scales[d] + biases[d]
            y = jnp.where(member, y_d, y)
            means.append(MOMENTUM * state.mean[d] + (1 - MOMENTUM) * jax.lax.stop_gradient(mean))
            variances.append(MOMENTUM * state.var[d] + (1 - MOMENTUM) * jax.lax.stop_gradient(var))
        loss = jnp.sum(y.astype(x.dtype).astype(jnp.float32) * ct.astype(jnp.float32))
        return loss, (jnp.stack(means), jnp.stack(variances))

    def pairs(b, f):
        (b_loss, b_stats), b_grads = b
        (f_loss, f_stats), f_grads = f
        return [
            ("loss", b_loss, f_loss),
            ("running mean", b_stats[0], f_stats[0]),
            ("running var", b_stats[1], f_stats[1]),
            *(
                (name, bg, fg)
                for name, bg, fg in zip(("dx", "dscale", "dbias"), b_grads, f_grads, strict=True)
            ),
        ]

    args = (x, scales, biases, state, ct)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    return Case(
        "domain_bn_train_grad",
        [Impl("bnjax", grad(bnjax_loss), args), Impl("jnp", grad(plain_loss), args)],
        pairs,
    )


def _conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def plain_cross_iteration(x, kernel, past, scale, bias):
    """The paper's CBN step written directly in jnp: (y, new past) with past = (mu, nu,
    d mu / dW, d nu / dW, W) stacked over the window - 1 previous steps (all full)."""
    y = _conv3x3(x, kernel)
    yf = y.astype(jnp.float32)
    mu, nu = jnp.mean(yf, (0, 1, 2)), jnp.mean(yf * yf, (0, 1, 2))
    past_mu, past_nu, past_dmu, past_dnu, past_w = past
    delta = jax.lax.stop_gradient(kernel.astype(jnp.float32))[None] - past_w
    comp_mu = past_mu + jnp.sum(past_dmu * delta, axis=(1, 2, 3))
    comp_nu = past_nu + jnp.sum(past_dnu * delta, axis=(1, 2, 3))
    mu_bar = (mu + jnp.sum(comp_mu, 0)) / CBN_WINDOW
    nu_bar = (nu + jnp.sum(jnp.maximum(comp_nu, comp_mu**2), 0)) / CBN_WINDOW
    out = (yf - mu_bar) * jax.lax.rsqrt(nu_bar - mu_bar**2 + BN_EPSILON) * scale + bias
    m = y.shape[0] * y.shape[1] * y.shape[2]
    xs, ws = jax.lax.stop_gradient(x.astype(jnp.float32)), jax.lax.stop_gradient(kernel)
    _, pullback = jax.vjp(lambda w: _conv3x3(xs, w), ws.astype(jnp.float32))
    (dmu,) = pullback(jnp.full(y.shape, 1.0 / m))
    (dnu,) = pullback(2.0 * jax.lax.stop_gradient(yf) / m)
    new = [jax.lax.stop_gradient(a) for a in (mu, nu, dmu, dnu, ws.astype(jnp.float32))]
    new_past = tuple(jnp.concatenate([n[None], p[:-1]]) for n, p in zip(new, past, strict=True))
    return out.astype(x.dtype), new_past


def cross_iteration_case(x, ct, scale, bias, key) -> Case:
    channels = x.shape[-1]
    k_w, k_p = jax.random.split(key)
    kernel = jax.random.normal(k_w, (3, 3, channels, channels), jnp.float32) / (3 * channels**0.5)
    # A full window from earlier steps under nearby kernels.
    state = bnjax.cross_iteration_state(kernel.shape, window=CBN_WINDOW)
    used = []
    for i in range(CBN_WINDOW - 1):
        used.insert(0, kernel + 0.01 * jax.random.normal(jax.random.fold_in(k_p, i), kernel.shape))
        _, state = bnjax.cross_iteration_batch_norm(
            x, used[0], state, conv=_conv3x3, training=True, momentum=MOMENTUM
        )
    past = (
        state.past_mean,
        state.past_var + state.past_mean**2,
        state.past_mean_grad,
        state.past_var_grad + 2 * state.past_mean[:, None, None, None, :] * state.past_mean_grad,
        jnp.stack(used),  # newest first, as the state's slots
    )

    def bnjax_loss(x, kernel, scale, bias, state, ct):
        y, new_state = bnjax.cross_iteration_batch_norm(
            x, kernel, state, scale, bias, conv=_conv3x3, training=True, momentum=MOMENTUM,
            epsilon=BN_EPSILON,
        )  # fmt: skip
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), new_state

    def plain_loss(x, kernel, scale, bias, past, ct):
        y, new_past = plain_cross_iteration(x, kernel, past, scale, bias)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), new_past

    argnums = (0, 1, 2, 3)
    bnjax_grad = jax.value_and_grad(bnjax_loss, argnums=argnums, has_aux=True)
    plain_grad = jax.value_and_grad(plain_loss, argnums=argnums, has_aux=True)
    kernel = kernel.astype(x.dtype)

    def pairs(b, f):
        (b_loss, b_state), b_grads = b
        (f_loss, f_past), f_grads = f
        named = [("loss", b_loss, f_loss), ("past mean", b_state.past_mean, f_past[0])]
        for name, bg, fg in zip(
            ("dx", "dkernel", "dscale", "dbias"), b_grads, f_grads, strict=True
        ):
            named.append((name, bg, fg))
        return named

    return Case(
        "cbn_train_grad",
        [
            Impl("bnjax", bnjax_grad, (x, kernel, scale, bias, state, ct)),
            Impl("flax", plain_grad, (x, kernel, scale, bias, past, ct)),
        ],
        pairs,
    )


# ----------------------------------------------------------------------------- torch (optional)


def torch_cases(shape, dtype, ops, key, torch) -> dict[str, tuple[Impl, Impl, Callable]]:
    """bnjax vs torch.nn.functional.batch_norm (channels-last NCHW == NHWC in memory).

    Returns {op: (bnjax impl, torch impl, compare)}; running variance is the unbiased one in
    torch, so bnjax runs with use_unbiased_running_var=True here.
    """
    functional = torch.nn.functional
    channels = shape[-1]
    k_x, k_ct, k_s, k_b = jax.random.split(key, 4)
    x = 1.0 + 2.0 * jax.random.normal(k_x, shape, jnp.float32)
    ct = jax.random.normal(k_ct, shape, jnp.float32)
    scale = 1.0 + 0.1 * jax.random.normal(k_s, (channels,), jnp.float32)
    bias = 0.1 * jax.random.normal(k_b, (channels,), jnp.float32)
    state = bnjax.batch_norm_state(channels)
    perm = (0, x.ndim - 1, *range(1, x.ndim - 1))  # NHWC -> NCHW view

    def nchw(a):
        t = torch.from_numpy(np.array(a)).permute(*perm)
        fmt = torch.channels_last if a.ndim == 4 else torch.contiguous_format
        return t.contiguous(memory_format=fmt)

    def nhwc(t):
        inverse = tuple(int(i) for i in np.argsort(perm))
        return t.detach().permute(*inverse).numpy()

    tx, tct = nchw(x), nchw(ct)
    tw = torch.from_numpy(np.array(scale))
    tb = torch.from_numpy(np.array(bias))
    torch_momentum = 1.0 - MOMENTUM

    def fresh_stats():
        return torch.zeros(channels), torch.ones(channels)

    kw = dict(momentum=MOMENTUM, epsilon=BN_EPSILON, use_unbiased_running_var=True)
    out = {}

    if "bn_train" in ops:
        rm, rv = fresh_stats()

        def torch_train(x, rm, rv, w, b):
            with torch.no_grad():
                return functional.batch_norm(
                    x, rm, rv, w, b, training=True, momentum=torch_momentum, eps=BN_EPSILON
                )

        def bnjax_train(x, state, scale, bias):
            return bnjax.batch_norm(x, state, scale, bias, training=True, **kw)

        def compare(b, _):
            rm0, rv0 = fresh_stats()
            y = torch_train(tx, rm0, rv0, tw, tb)
            return [
                ("y", b[0], nhwc(y)),
                ("running mean", b[1].mean, rm0.numpy()),
                ("running var", b[1].var, rv0.numpy()),
            ]

        out["bn_train"] = (
            Impl("bnjax", bnjax_train, (x, state, scale, bias)),
            Impl("torch", torch_train, (tx, rm, rv, tw, tb)),
            compare,
        )

    if "bn_train_grad" in ops:
        rm, rv = fresh_stats()
        gx = tx.detach().clone().requires_grad_(True)
        gw = tw.detach().clone().requires_grad_(True)
        gb = tb.detach().clone().requires_grad_(True)

        def torch_grad(x, rm, rv, w, b, ct):
            y = functional.batch_norm(
                x, rm, rv, w, b, training=True, momentum=torch_momentum, eps=BN_EPSILON
            )
            loss = (y * ct).sum()
            grads = torch.autograd.grad(loss, (x, w, b))
            return loss.detach(), grads

        def bnjax_loss(x, scale, bias, state, ct):
            y, new_state = bnjax.batch_norm(x, state, scale, bias, training=True, **kw)
            return jnp.sum(y * ct), new_state

        def compare(b, _):
            (b_loss, _), (b_dx, b_dscale, b_dbias) = b
            rm0, rv0 = fresh_stats()
            loss, (dx, dw, db) = torch_grad(gx, rm0, rv0, gw, gb, tct)
            return [
                ("loss", b_loss, loss.numpy()),
                ("dx", b_dx, nhwc(dx)),
                ("dscale", b_dscale, dw.numpy()),
                ("dbias", b_dbias, db.numpy()),
            ]

        out["bn_train_grad"] = (
            Impl(
                "bnjax",
                jax.value_and_grad(bnjax_loss, argnums=(0, 1, 2), has_aux=True),
                (x, scale, bias, state, ct),
            ),
            Impl("torch", torch_grad, (gx, rm, rv, gw, gb, tct)),
            compare,
        )

    if "bn_eval" in ops:
        rm, rv = fresh_stats()

        def torch_eval(x, rm, rv, w, b):
            with torch.no_grad():
                return functional.batch_norm(x, rm, rv, w, b, training=False, eps=BN_EPSILON)

        def bnjax_eval(x, state, scale, bias):
            return bnjax.batch_norm(x, state, scale, bias, training=False, epsilon=BN_EPSILON)

        out["bn_eval"] = (
            Impl("bnjax", bnjax_eval, (x, state, scale, bias)),
            Impl("torch", torch_eval, (tx, rm, rv, tw, tb)),
            lambda b, _: [("y", b[0], nhwc(torch_eval(tx, *fresh_stats(), tw, tb)))],
        )
    return out


def import_torch(disabled: bool):
    if disabled:
        return None, "disabled (--no_torch)"
    try:
        import torch  # optional dependency
    except Exception as error:  # ImportError, or a broken install
        return None, f"not available ({type(error).__name__}: {error})"
    return torch, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- checks, timing


def max_error(a, b) -> float:
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def check_agreement(tag: str, pairs, tolerance: float, reference: str) -> float:
    worst = 0.0
    failures = []
    for label, a, b in pairs:
        err = max_error(a, b)
        worst = max(worst, err)
        if not err <= tolerance:
            failures.append(f"{label}: normalized max diff {err:.3g} > {tolerance:g}")
    abort_if_disagreeing(failures, f"bnjax and {reference} on {tag}")
    return worst


def check_dtypes(tag: str, b_out, f_out) -> None:
    b_leaves = [getattr(v, "dtype", None) for v in jax.tree.leaves(b_out)]
    f_leaves = [getattr(v, "dtype", None) for v in jax.tree.leaves(f_out)]
    if b_leaves and f_leaves and b_leaves[0] != f_leaves[0]:
        raise SystemExit(f"ABORT: {tag}: bnjax returns {b_leaves[0]}, flax {f_leaves[0]}")


def time_interleaved(impls: Sequence[Impl], repeats: int, warmup: int) -> None:
    for impl in impls:
        for _ in range(warmup):
            impl()
    n = len(impls)
    for r in range(repeats):
        for i in range(n):
            impl = impls[(i + r) % n]
            start = time.perf_counter()
            impl()
            impl.times.append(time.perf_counter() - start)


# ----------------------------------------------------------------------------- reporting


def fmt_memory_ratio(a: float | None, b: float | None, negligible: float) -> str:
    """Ratio of temp sizes; scratch below `negligible` MiB on both sides has no meaningful ratio."""
    if a is not None and b is not None and max(a, b) < negligible:
        return "n/a (both ~0)"
    return fmt_ratio(a, b)


def environment_lines(dtype, repeats, torch_note) -> list[str]:
    device = jax.devices()[0]
    return [
        f"- jax {jax.__version__}, jaxlib {package_version('jaxlib')}, flax {flax.__version__}, "
        f"bnjax {bnjax.__version__}, numpy {np.__version__}",
        f"- backend: {jax.default_backend()}, device: {device.device_kind} ({device}), "
        f"{jax.device_count()} device(s); host: {platform.machine()}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}",
        f"- dtype {jnp.dtype(dtype).name}, {repeats} timed rounds (median), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        f"- torch: {torch_note}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per op (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[parse_shape(s) for s in DEFAULT_SHAPES],
        help="NHWC shapes such as 128x32x32x64 (channels last)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=OPS)
    parser.add_argument("--out", help="also write the Markdown report to this path")
    parser.add_argument("--dump_hlo", help="directory for the compiled HLO of every function")
    parser.add_argument("--no_torch", action="store_true", help="skip PyTorch even if present")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    tolerance = 1e-3 if dtype.itemsize >= 4 else 2e-2
    torch, torch_note = import_torch(args.no_torch or dtype != jnp.float32)
    if torch is None and dtype != jnp.float32 and not args.no_torch:
        torch_note = "skipped (float32 only)"
    started = time.perf_counter()
    key = jax.random.key(args.seed)

    rows, details, torch_rows, copy_lines = [], [], [], []
    for shape in args.shapes:
        label = shape_label(shape)
        print(f"== {label} {dtype.name}", flush=True)
        key, k_case = jax.random.split(key)
        cases = build_cases(shape, dtype, args.ops, k_case)
        x = cases[0].impls[0].args[0] if cases else jnp.zeros(shape, dtype)
        copy = Impl("copy", lambda x: x * 2, (x,))
        compile_impl(copy, args.dump_hlo, f"{label}_copy")
        tcases = torch_cases(shape, dtype, args.ops, k_case, torch) if torch else {}

        for case in cases:
            tag = f"{label} {OP_LABELS[case.op]}"
            for impl in case.impls:
                compile_impl(impl, args.dump_hlo, f"{label}_{case.op}")
            b_out, f_out = case.impls[0](), case.impls[1]()
            check_dtypes(tag, b_out, f_out)
            worst = check_agreement(tag, case.compare(b_out, f_out), tolerance, "flax")
            timed = [*case.impls, copy]
            if case.op in tcases:
                t_bnjax, t_torch, t_compare = tcases[case.op]
                compile_impl(t_bnjax, None, "")
                check_agreement(tag, t_compare(t_bnjax(), None), tolerance, "torch")
                timed.append(t_torch)
            print(
                f"  {OP_LABELS[case.op]}: agree (max normalized diff {worst:.1e}); timing",
                flush=True,
            )
            time_interleaved(timed, args.repeats, args.warmup)
            b, f = case.impls
            rows.append((label, case.op, b, f, copy))
            details.append((label, case.op, b, f))
            if case.op in tcases:
                t_bnjax, t_torch, _ = tcases[case.op]
                # The bnjax executable for torch's conventions is b's computation plus an
                # unbiased-variance rescale; compare against b's own (interleaved) timing.
                torch_rows.append((label, case.op, b, t_torch))
        copy_lines.append((label, copy))

    table = [
        "| shape | op | bnjax ms | flax ms | time ratio | bnjax temp MiB | flax temp MiB "
        "| memory ratio | x copy (bnjax / flax) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, op, b, f, copy in rows:
        b_temp, f_temp = mem_field(b, "temp_size_in_bytes"), mem_field(f, "temp_size_in_bytes")
        # Below 1% of the input's size, temp is a few per-channel vectors: no ratio worth reading.
        negligible = 0.01 * copy.args[0].size * copy.args[0].dtype.itemsize / MIB
        c = copy.median_ms
        table.append(
            f"| {label} | {OP_LABELS[op]} | {b.median_ms:.2f} | {f.median_ms:.2f} "
            f"| {fmt_ratio(b.median_ms, f.median_ms)} | {fmt_mib(b_temp)} | {fmt_mib(f_temp)} "
            f"| {fmt_memory_ratio(b_temp, f_temp, negligible)} "
            f"| {b.median_ms / c:.1f} / {f.median_ms / c:.1f} |"
        )
    copy_table = ["| shape | x * 2 ms | GB/s (read + write) |", "|---|---:|---:|"]
    for label, copy in copy_lines:
        nbytes = 2 * copy.args[0].size * copy.args[0].dtype.itemsize
        copy_table.append(
            f"| {label} | {copy.median_ms:.2f} | {nbytes / copy.median_ms / 1e6:.1f} |"
        )
    detail_table = [
        "| shape | op | impl | args MiB | out MiB | temp MiB | peak MiB | kernels | min ms "
        "| median ms | max ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, op, *impls in details:
        for impl in impls:
            detail_table.append(
                f"| {label} | {OP_LABELS[op]} | {impl.name} "
                f"| {fmt_mib(mem_field(impl, 'argument_size_in_bytes'))} "
                f"| {fmt_mib(mem_field(impl, 'output_size_in_bytes'))} "
                f"| {fmt_mib(mem_field(impl, 'temp_size_in_bytes'))} "
                f"| {fmt_mib(mem_field(impl, 'peak_memory_in_bytes'))} "
                f"| {fusion_count(impl.hlo)} | {1e3 * min(impl.times):.2f} "
                f"| {impl.median_ms:.2f} | {1e3 * max(impl.times):.2f} |"
            )
    report = [
        f"## bnjax vs flax.linen normalization ({dtype.name}, NHWC)",
        "",
        *environment_lines(dtype, args.repeats, torch_note),
        "",
        *table,
        "",
        "Time and memory ratios are bnjax / flax (lower is better for bnjax); temp is XLA's "
        "scratch beyond arguments and outputs; x copy is each median over that of a jitted "
        "`x * 2` on the same array:",
        "",
        *copy_table,
        "",
        "Details (kernels = fusions, reductions and custom calls in the entry computation):",
        "",
        *detail_table,
    ]
    if torch_rows:
        report += [
            "",
            "PyTorch (torch.nn.functional.batch_norm, channels-last, float32):",
            "",
            "| shape | op | bnjax ms | torch ms | time ratio |",
            "|---|---|---:|---:|---:|",
        ]
        for label, op, b, t in torch_rows:
            report.append(
                f"| {label} | {OP_LABELS[op]} | {b.median_ms:.2f} | {t.median_ms:.2f} "
                f"| {fmt_ratio(b.median_ms, t.median_ms)} |"
            )
    elapsed = time.perf_counter() - started
    report += ["", f"Total benchmark time: {elapsed:.0f} s."]
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
