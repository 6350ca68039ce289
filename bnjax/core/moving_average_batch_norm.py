"""Moving average batch normalization (MABN): batch statistics of both passes averaged over steps.

Batch norm's training step depends on the batch through four statistics per channel: the
forward's mean mu_B and variance sigma2_B, and the backward's

    g_B   = mean_i dL/dx_hat_i,        psi_B = mean_i dL/dx_hat_i * x_hat_i,
    dL/dx_i = (dL/dx_hat_i - g_B - x_hat_i * psi_B) / sqrt(sigma2_B + epsilon).

With small batches all four are noisy. MABN replaces each by its simple moving average over
the last m = `window` steps (the current one included),

    s_bar_t = (s_B_t + s_B_{t-1} + ... + s_B_{t-m+1}) / m          for s in (mu, sigma2, g, psi)

and, by default, *reduces* the statistics: without the mean (mu = g = 0, relying on
zero-mean weights in the layer before, see `bnjax.centralize_weight`) the variance becomes the
second moment chi_B = mean_i x_i^2, and

    forward:   x_hat = x / sqrt(chi_bar + epsilon),            z = r * x_hat
    backward:  dL/dx_i = (dL/dx_hat_i - x_hat_i * psi_bar) / sqrt(chi_bar + epsilon),
               dL/dx_hat = r * dL/dz
    output:    y = scale * z + bias

`r = clip(sqrt(chi_bar + epsilon) / sqrt(var + epsilon), 1 / r_max, r_max)` (no gradient) is
batch renormalization's correction towards the exponential moving average `var`, which
evaluation uses: unclipped, training outputs equal evaluation outputs. r is 1 during the
first `renorm_warmup_steps` steps (default 1000). The exponential average follows the
averaged statistic, ``var = momentum * var + (1 - momentum) * chi_bar`` (momentum = decay,
flax's convention), so is exactly batch norm's affine with running statistics (mean 0 in the reduced
form) and folds into the layer before like batch norm. `centered=True` keeps all four
statistics (mu_bar is subtracted, g_bar enters the backward, renormalization also shifts by
``d = clip((mu_bar - mean) / sqrt(var + epsilon), -d_max, d_max)``); with window=1 and no
renormalization it is exactly batch norm, forward, gradient and running statistics.

The gradient is deliberately not the derivative of the forward: psi_bar (and g_bar) average
past steps' backward statistics. The current step's g_B and psi_B are only known in its
backward pass, where nothing can be stored. They leave through the gradient of `probe`, an
extra zero input of shape (2, *feature_shape) that the output does not depend on: its
"gradient" is defined as the stack (g_B, psi_B), means over the valid values of the global
batch. After differentiating, fold them into the state with
`moving_average_batch_norm_backward_update(state, probe_grad)`. A gradient computation that
does not differentiate `probe` still gets MABN's gradient; the state then just never learns
the backward statistics (psi_bar averages the current step only).

Shapes: x (N, ..., C) with `axis=-1` (any feature axes); scale, bias (C,); the state's
histories (window - 1, C) hold the previous steps' batch statistics (a ring, oldest
overwritten), so the state costs 4 * (window - 1) + 2 values per channel in float32.

Across devices (`axis_name`) chi_B (or mu_B, sigma2_B: merged exactly, as `batch_norm`) and
g_B, psi_B (one psum of two sums per channel) are global, so the replicated state stays
identical. The backward statistics are in the units of the cotangent that reaches the layer:
in data-parallel training with a per-device mean loss they are the device count times those
of the global mean loss, consistently from step to step (keep the device count of a run).

References:
  Yan, Wan, Zhang, Zhang, Wei & Sun (2020), Towards Stabilizing Batch Statistics in Backward
  Propagation of Batch Normalization, ICLR, arXiv:2001.06838: Section 3 (the four batch
  statistics of BN's forward and backward passes), Section 4.1 (moving average statistics,
  simple SMAS over the last m iterations and exponential EMAS), Section 4.2 (reduced
  statistics: normalization by the second moment, with only psi in the backward), Section 4.3
  (weight centralization), and Algorithm 1 (training with SMAS and renormalization towards the
  EMAS used in inference).
  Ioffe (2017), Batch Renormalization, NeurIPS, arXiv:1702.03275 (the r, d correction).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.batch_layout import as_param, batch_layout, grouped_mask
from bnjax.core.batch_norm import evaluate
from bnjax.core.moving_average_state import (
    MovingAverageBatchNormState,
    check_state,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
    past_sum,
    written,
)
from bnjax.core.running_update import all_finite

__all__ = [
    "MovingAverageBatchNormState",
    "moving_average_batch_norm",
    "moving_average_batch_norm_backward_update",
    "moving_average_batch_norm_probe",
    "moving_average_batch_norm_state",
]

Array = jax.Array


class _Kernel(NamedTuple):
    """Static options of the MABN kernel (hashable: a nondiff argument)."""

    reduction_axes: tuple[int, ...]
    centered: bool
    axis_name: object
    axis_index_groups: tuple[tuple[int, ...], ...] | None


def _varying_axes(value) -> frozenset:
    """The shard_map axes over which `value` may differ between devices (none elsewhere)."""
    return frozenset(jax.typeof(value).mat.varying)


def _varying_like(cotangent, primal):
    """`cotangent` with the device-variance type of `primal`, as a custom VJP must return it
    under `jax.shard_map`: summed over the axes where only the cotangent varies (the
    transpose of broadcasting an invariant value), cast to varying over those where only the
    primal does (the backward statistics are already the same on every device)."""
    summed = tuple(_varying_axes(cotangent) - _varying_axes(primal))
    if summed:
        cotangent = lax.psum(cotangent, summed)
    cast = tuple(_varying_axes(primal) - _varying_axes(cotangent))
    return lax.pcast(cotangent, cast, to="varying") if cast else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _averaged_normalize(config, x, scale, bias, mask, mean, inv, r, d, count, past, probe):
    """y = scale * (r * (x - mean) * inv + d) + bias in x's dtype, with MABN's gradient.

    scale, bias: per-channel parameters (size 1 on the reduction axes), differentiated.
    mean, inv, r, d, count: per-channel, no gradient. past: (sum of past g_B, sum of past
    psi_B, their number), per channel. probe: unused in the value; its cotangent is
    (g_B, psi_B) in its own shape.
    """
    del config, mask, count, past, probe
    z = r * (x.astype(mean.dtype) - mean) * inv + d
    return (z * scale + bias).astype(x.dtype)


def _averaged_normalize_fwd(config, x, scale, bias, mask, mean, inv, r, d, count, past, probe):
    y = _averaged_normalize(config, x, scale, bias, mask, mean, inv, r, d, count, past, probe)
    # Only x and per-channel values are kept: x_hat is recomputed in the backward's loops.
    return y, (x, scale, mask, mean, inv, r, d, count, past, probe)


def _averaged_normalize_bwd(config, residuals, dy):
    x, scale, mask, mean, inv, r, d, count, past, probe = residuals
    dy = dy.astype(mean.dtype)
    x_hat = (x.astype(mean.dtype) - mean) * inv
    # A second x_hat from barrier-separated statistics: one copy feeds the reductions, the
    # other the elementwise dx, so XLA fuses each into its consumer instead of storing one
    # full-size x_hat for both (as the batch-norm kernel does).
    barrier_mean, barrier_inv = lax.optimization_barrier((mean, inv))
    x_hat_for_sums = (x.astype(mean.dtype) - barrier_mean) * barrier_inv
    axes = config.reduction_axes

    def sums(values):  # (sum dy, sum dy * x_hat) over the reduction axes
        return (
            jnp.sum(values, axis=axes, keepdims=True),
            jnp.sum(values * x_hat_for_sums, axis=axes, keepdims=True),
        )

    dy_sum, dy_x_hat_sum = sums(dy)
    dscale = r * dy_x_hat_sum + d * dy_sum
    # dL/dx_hat = r * scale * dy, so its statistics over the valid values are per-channel
    # multiples of the same two sums.
    valid = (dy_sum, dy_x_hat_sum) if mask is None else sums(jnp.where(mask, dy, 0))
    gain = r * scale
    backward = (gain * valid[0], gain * valid[1])
    if config.axis_name is not None:
        backward = lax.psum(backward, config.axis_name, axis_index_groups=config.axis_index_groups)
    safe = jnp.maximum(count, 1)
    grad_mean, grad_scaled = backward[0] / safe, backward[1] / safe
    past_grad_mean, past_grad_scaled, stored = past
    grad_scaled_bar = (grad_scaled + past_grad_scaled) / (1 + stored)
    correction = x_hat * grad_scaled_bar
    if config.centered:
        correction = correction + (grad_mean + past_grad_mean) / (1 + stored)
    else:
        grad_mean = jnp.zeros_like(grad_mean)
    if mask is not None:  # masked values are not in the statistics: no statistics term
        correction = jnp.where(mask, correction, 0)
    dx = (inv * (gain * dy - correction)).astype(x.dtype)
    probe_grad = jnp.stack([grad_mean, grad_scaled]).reshape(probe.shape).astype(probe.dtype)
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    dx, dscale, dy_sum, probe_grad = (
        _varying_like(cotangent, primal)
        for cotangent, primal in zip(
            (dx, dscale, dy_sum, probe_grad), (x, scale, scale, probe), strict=True
        )
    )
    return (dx, dscale, dy_sum, None, zeros(mean), zeros(inv), zeros(r), zeros(d), zeros(count),
            zeros(past), probe_grad)  # fmt: skip


_averaged_normalize.defvjp(_averaged_normalize_fwd, _averaged_normalize_bwd)


def _forward_statistics(x, mask, config: _Kernel):
    """(count, mu_B, sigma2_B) per channel; in the reduced form mu_B = 0, sigma2_B = chi_B."""
    if config.centered:
        moments = stats.reduce_moments(
            x, config.reduction_axes, mask, config.axis_name, config.axis_index_groups
        )
        return moments.count, moments.mean, moments.m2 / jnp.maximum(moments.count, 1)
    count, second_moment = stats.mean_square(
        x, config.reduction_axes, mask, config.axis_name, config.axis_index_groups
    )
    count = jnp.broadcast_to(count, second_moment.shape)
    return count, jnp.zeros_like(second_moment), second_moment


def moving_average_batch_norm(
    x: Array,
    state: MovingAverageBatchNormState,
    scale: Array | None = None,
    bias: Array | None = None,
    probe: Array | None = None,
    *,
    training: bool,
    momentum: float = 0.98,
    epsilon: float = 1e-5,
    centered: bool = False,
    r_max: float = 5.0,
    d_max: float = 5.0,
    renorm_warmup_steps: int = 1000,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups=None,
    mask: Array | None = None,
) -> tuple[Array, MovingAverageBatchNormState]:
    """Moving average batch normalization (see the module docstring for the math).

    Args:
      x: input, e.g. (N, H, W, C) with `axis=-1`. Statistics in float32 (float64 for float64
        x); y has x's dtype.
      state: a MovingAverageBatchNormState (`moving_average_batch_norm_state`); its window
        sets m.
      scale, bias: optional (C,) parameters; None means 1 and 0.
      probe: optional zeros (2, *feature_shape) (`moving_average_batch_norm_probe`) whose
        gradient is this step's (g_B, psi_B); pass it to
        `moving_average_batch_norm_backward_update`.
      training: True normalizes with the moving averages of the batch statistics and folds
        this batch's forward statistics into the state; False is batch norm's evaluation with
        (state.mean, state.var) and returns the state unchanged.
      momentum: decay of the exponential averages `mean`, `var` (default 0.98).
      epsilon: added to the variance (second moment) before the square root.
      centered: keep the mean statistics mu and g (Section 4.1's four statistics) instead of
        the reduced form (Section 4.2, the default).
      r_max, d_max: renormalization bounds (r in [1 / r_max, r_max], |d| <= d_max; d only
        when centered); r_max=1 and d_max=0 switch renormalization off.
      renorm_warmup_steps: steps (state.count) before renormalization starts (r = 1, d = 0),
        while the exponential averages settle: at the start they hold var = 1, and
        renormalizing towards them would undo the normalization. The default 1000 is the
        authors' implementation's.
      axis: feature axis or axes.
      axis_name, axis_index_groups: devices sharing statistics (pmap / shard_map), merged
        exactly as in `batch_norm`.
      mask: booleans broadcastable to x; False entries stay out of the statistics.

    Returns:
      (y, new_state). A training batch whose statistics are not finite is left out of the
      state (only `skipped` advances). A channel without valid values outputs its bias.

    Example:
      >>> x = jnp.array([[1.0], [-1.0], [3.0], [-3.0]])      # second moment 5
      >>> state = moving_average_batch_norm_state(1, window=2)
      >>> y, state = moving_average_batch_norm(x, state, training=True, r_max=1.0)
      >>> [round(float(v), 3) for v in y[:, 0] * 5**0.5], state.var_history.tolist()
      ([1.0, -1.0, 3.0, -3.0], [[5.0]])
    """
    given_state = state
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    if jnp.iscomplexobj(x):
        raise TypeError("`x` must be real: moving average batch norm has no complex form.")
    training = checks.check_training(training)
    checks.check_epsilon(epsilon)
    checks.check_momentum(momentum, allow_none=False)
    checks.check_axis_name(axis_name, axis_index_groups)
    centered = checks.check_option_flag(centered, "centered")
    checks.check_in_range(r_max, "r_max", 1.0, why=" (1 switches renormalization off)")
    checks.check_in_range(d_max, "d_max", 0.0, why=" (0 switches the shift off)")
    renorm_warmup_steps = checks.as_int(renorm_warmup_steps, "renorm_warmup_steps")
    if renorm_warmup_steps < 0:
        raise ValueError(f"`renorm_warmup_steps` must be >= 0, got {renorm_warmup_steps}.")
    if x.ndim < 2:
        raise ValueError(
            f"`x` must have a batch axis and a feature axis, got shape {tuple(x.shape)}; "
            f"for a single feature vector use x[None]."
        )
    layout = batch_layout(x, axis, None)
    state = check_state(state, layout.feature_shape, axis)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, layout.feature_shape, "scale", "axis", input_dtype=x.dtype)
    checks.check_param_shape(bias, layout.feature_shape, "bias", "axis", input_dtype=x.dtype)
    probe_shape = (2, *layout.feature_shape)
    if probe is not None and tuple(jnp.shape(probe)) != probe_shape:
        raise ValueError(
            f"`probe` has shape {tuple(jnp.shape(probe))}, expected {probe_shape}; create it "
            f"with bnjax.moving_average_batch_norm_probe(state)."
        )
    if not training:
        y = evaluate(
            x,
            state.as_batch_norm_state(),
            scale,
            bias,
            epsilon=epsilon,
            layout=layout,
            function="moving_average_batch_norm",
        )
        return y, given_state
    if axis_name is not None:
        stats.check_axis_name_bound(axis_name)
    dtype = stats.stats_dtype(x.dtype)
    config = _Kernel(
        layout.reduction_axes,
        centered,
        axis_name,
        None if axis_index_groups is None else tuple(map(tuple, axis_index_groups)),
    )
    grouped_x = x.reshape(layout.grouped_shape)
    mask_ = grouped_mask(mask, x, layout)
    count, batch_mean, batch_var = _forward_statistics(lax.stop_gradient(grouped_x), mask_, config)
    estimated = count >= (2 if centered else 1)

    def param(value):  # a per-feature array of the state, in the grouped view
        return as_param(value, layout, 0.0, dtype)

    def averaged(batch, history, stored):
        past, filled = past_sum(history.astype(dtype), stored)
        return (batch + param(past)) / (1 + filled)

    mean_bar = averaged(batch_mean, state.mean_history, state.count)
    var_bar = averaged(batch_var, state.var_history, state.count)
    inv = stats.inverse_root(estimated.astype(dtype), var_bar, epsilon)
    running_inv = lax.rsqrt(param(state.var) + epsilon)
    renorm = state.count >= renorm_warmup_steps
    r = jnp.where(renorm, jnp.clip(running_inv / jnp.where(inv > 0, inv, 1), 1 / r_max, r_max), 1)
    d = jnp.zeros_like(r)
    if centered:
        shift = jnp.clip((mean_bar - param(state.mean)) * running_inv, -d_max, d_max)
        d = jnp.where(renorm & estimated, shift, 0)  # an unestimated channel outputs its bias
    grad_past = (
        *(param(past_sum(getattr(state, name).astype(dtype), state.backward_count)[0])
          for name in ("grad_mean_history", "grad_scaled_history")),
        jnp.minimum(state.backward_count, state.window - 1).astype(dtype),
    )  # fmt: skip
    if probe is None:
        probe = jnp.zeros(probe_shape, state.var.dtype)
    y = _averaged_normalize(
        config,
        grouped_x,
        as_param(scale, layout, 1.0, dtype),
        as_param(bias, layout, 0.0, dtype),
        mask_,
        mean_bar,
        inv,
        lax.stop_gradient(r),
        lax.stop_gradient(d),
        count,
        grad_past,
        probe,
    )

    feature_shape = layout.feature_shape

    def per_feature(value):
        return value.reshape(feature_shape)

    estimated = per_feature(estimated)
    # A channel the batch could not estimate keeps its averages; its history slot takes the
    # exponential average, a stand-in that keeps the ring's order.
    new_mean = jnp.where(
        estimated, momentum * state.mean + (1 - momentum) * per_feature(mean_bar), state.mean
    )
    new_var = jnp.where(
        estimated, momentum * state.var + (1 - momentum) * per_feature(var_bar), state.var
    )
    slot_mean = jnp.where(estimated, per_feature(batch_mean), state.mean)
    slot_var = jnp.where(estimated, per_feature(batch_var), state.var)
    folded = all_finite(new_mean, new_var, slot_mean, slot_var)
    folded = lax.stop_gradient(folded)
    new_state = state._replace(
        mean=jnp.where(folded, new_mean, state.mean).astype(state.mean.dtype),
        var=jnp.where(folded, new_var, state.var).astype(state.var.dtype),
        mean_history=jnp.where(
            folded, written(state.mean_history, state.count, slot_mean), state.mean_history
        ),
        var_history=jnp.where(
            folded, written(state.var_history, state.count, slot_var), state.var_history
        ),
        count=state.count + folded.astype(jnp.int32),
        skipped=state.skipped + (~folded).astype(jnp.int32),
    )
    new_state = jax.tree.map(lax.stop_gradient, new_state)
    return y.reshape(x.shape), new_state
