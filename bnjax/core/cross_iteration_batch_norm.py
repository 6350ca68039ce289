"""Cross-iteration batch normalization (CBN): statistics pooled over the last `window` steps.

A layer ``y = conv(x, W)`` (a convolution or a dense layer: linear in its kernel W, whose last
axis is the output channel j) is normalized with statistics of the current batch *and* of the
batches of the ``window - 1`` previous training steps. Those were computed under older kernels
W_{t-tau}, so each is first carried to the current kernel W_t by its first-order Taylor term in
W (only the layer's own kernel, and for channel j only its column W_j matters):

    mu_{t-tau}(W_t) = mu_{t-tau} + <d mu_j / d W_j, W_t,j - W_{t-tau},j>
    nu_{t-tau}(W_t) = nu_{t-tau} + <d nu_j / d W_j, W_t,j - W_{t-tau},j>
    d mu_j / d W_j = E[p],      d nu_j / d W_j = 2 E[y_j p]

where nu is the second moment E[y^2], p the input patch (fan-in vector) that produces y_j at a
position, and E the mean over the valid positions of the (global) batch. The mean is linear in
W, so its compensation is exact; the second moment's is first order. Then, over the set S of
steps in the window (the current one and the filled past slots, |S| <= window):

    mu_bar  = 1/|S| sum_tau mu_{t-tau}(W_t)
    nu_bar  = 1/|S| sum_tau max(nu_{t-tau}(W_t), mu_{t-tau}(W_t)^2)
    var_bar = nu_bar - mu_bar^2
    out = scale * (y - mu_bar) / sqrt(var_bar + epsilon) + bias

The max keeps each compensated second moment a valid one (variance >= 0), and then var_bar >= 0.
The state keeps no past kernel: it keeps ``<d / d W, W_{t-tau}>`` per channel, and the Taylor
term is ``<d / d W, W_t> - <d / d W, W_{t-tau}>`` (a third less memory).

How it is computed (the same numbers, stably): the state keeps each past batch's biased
*variance* var = nu - mu^2 and its kernel derivative ``d var / d W = d nu / d W - 2 mu d mu / d W
= 2 E[(y - mu) p]`` instead of nu and d nu / d W. The compensated variance is then
``var + <d var / d W, dW> - <d mu / d W, dW>^2``, which is nu(W_t) - mu(W_t)^2 exactly; the max
above is ``max(var, 0)``; and ``var_bar = mean(max(var, 0)) + mean((mu - mu_bar)^2)`` (Chan's
equal-weight merge), which is nu_bar - mu_bar^2 without ever subtracting two large numbers.

Gradients: the current step's mu_t and var_t are differentiated (through y, to x and W_t);
the compensated past statistics are constants, as in the paper.

Burn-in: for the first `burn_in` training steps the layer is plain batch norm (the current
batch alone), while the window fills; afterwards it pools the current step and every filled
past slot. With the default ``burn_in = window - 1`` the window is full when pooling starts.

Running statistics for evaluation follow batch norm's rule (``momentum`` is the decay of the
running average, biased variance), fed with the statistics the step normalized with (mu_bar,
var_bar after burn-in). Evaluation is the affine ``scale * (y - mean) / sqrt(var + epsilon) +
bias`` of the conv's output, foldable into the conv.

References:
  Yao, Cao, Zheng, Huang & Lin (2021), Cross-Iteration Batch Normalization, CVPR,
  arXiv:2002.05712: Sec. 3.2, the first-order Taylor compensation of a past iteration's mean
  and second moment, restricted to the layer's own weights, and the efficient per-channel
  derivatives of a conv's statistics; Sec. 3.3, the statistics pooled over k iterations with
  the max of each compensated second moment and the squared mean, the normalization with
  them, and the burn-in period of plain batch norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.channels_last_conv import convolution, dense
from bnjax.core.running_update import MIN_VALUES_PER_ESTIMATE, BatchUpdate, running_update
from bnjax.core.state_guard import check_known_statistics, guard_statistics

__all__ = [
    "CrossIterationState",
    "convolution",
    "cross_iteration_batch_norm",
    "cross_iteration_state",
    "dense",
]

Array = jax.Array
_FUNCTION = "cross_iteration_batch_norm"


class CrossIterationState(NamedTuple):
    """State of a cross-iteration batch-norm layer with kernel shape K = (..., C) (a pytree).

    Past slots are ordered newest first (slot 0 is the previous training step); slot i holds
    data once ``step > i``. Every array is float32 (float64 under x64).

    Attributes:
      past_mean: (window - 1, C) mean of each past batch's conv output, under its own kernel.
      past_var: (window - 1, C) its biased variance.
      past_mean_grad: (window - 1, *K) d mean / d kernel of that batch, E[p] per channel.
      past_var_grad: (window - 1, *K) d var / d kernel of that batch, 2 E[(y - mean) p].
      past_mean_offset: (window - 1, C) <past_mean_grad, W_past> over the fan-in, with W_past
        the kernel that batch was computed with (so the Taylor term needs no past kernel).
      past_var_offset: (window - 1, C) <past_var_grad, W_past>.
      mean: (C,) running mean for evaluation.
      var: (C,) running (biased) variance for evaluation.
      step: int32 scalar, training steps whose statistics entered the window (burn-in clock).
      count: int32 scalar, batches folded into the running statistics.
      skipped: int32 scalar, training batches left out of the running statistics (not finite).

    Example:
      >>> state = cross_iteration_state((3, 3, 16, 32), window=4)
      >>> state.past_mean_grad.shape, state.past_mean_offset.shape, int(state.step)
      ((3, 3, 3, 16, 32), (3, 32), 0)
    """

    past_mean: Array
    past_var: Array
    past_mean_grad: Array
    past_var_grad: Array
    past_mean_offset: Array
    past_var_offset: Array
    mean: Array
    var: Array
    step: Array
    count: Array
    skipped: Array

    @property
    def window(self) -> int:
        """Steps pooled once the window is full: the current one and ``window - 1`` past."""
        return self.past_mean.shape[0] + 1


def cross_iteration_state(
    kernel_shape: Sequence[int], window: int = 4, dtype=None
) -> CrossIterationState:
    """A fresh state for a kernel of shape `kernel_shape` (last axis: output channels C).

    Args:
      kernel_shape: e.g. (3, 3, C_in, C) for a 2-D conv (flax's HWIO), (C_in, C) for a dense.
      window: k, the number of steps pooled (k = 1 is plain batch norm).
      dtype: statistics dtype; default float32 (float64 under x64).

    Memory: ``(window - 1) * (4 C + 2 prod(K)) + 2 C`` floats and three int32 counters.

    Example:
      >>> state = cross_iteration_state((3, 3, 64, 64), window=4)       # 3x3 conv 64 -> 64
      >>> sum(leaf.nbytes for leaf in jax.tree.leaves(state))              # bytes
      888332
    """
    shape = tuple(checks.as_int(n, "kernel_shape") for n in kernel_shape)
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise ValueError(
            f"`kernel_shape` must have a fan-in and an output-channel axis, all positive, got "
            f"{tuple(kernel_shape)!r} (e.g. (3, 3, 16, 32) for a 3x3 conv 16 -> 32)."
        )
    window = checks.as_int(window, "window")
    if window < 1:
        raise ValueError(f"`window` must be >= 1 (1 is plain batch norm), got {window}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise TypeError(f"`dtype` of the statistics must be float32 or float64, got {dtype}.")
    channels, past = shape[-1], window - 1
    zeros = jnp.zeros((past, *shape), dtype)
    return CrossIterationState(
        past_mean=jnp.zeros((past, channels), dtype),
        past_var=jnp.zeros((past, channels), dtype),
        past_mean_grad=zeros,
        past_var_grad=zeros,
        past_mean_offset=jnp.zeros((past, channels), dtype),
        past_var_offset=jnp.zeros((past, channels), dtype),
        mean=jnp.zeros((channels,), dtype),
        var=jnp.ones((channels,), dtype),
        step=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _check_state(state, kernel_shape: tuple[int, ...]) -> CrossIterationState:
    if not isinstance(state, CrossIterationState):
        raise TypeError(
            f"`state` must be a CrossIterationState (from bnjax.cross_iteration_state), got "
            f"{type(state).__name__}."
        )
    channels = kernel_shape[-1]
    past = state.past_mean.shape[0] if state.past_mean.ndim == 2 else -1
    expected = dict(
        past_mean=(past, channels),
        past_var=(past, channels),
        past_mean_grad=(past, *kernel_shape),
        past_var_grad=(past, *kernel_shape),
        past_mean_offset=(past, channels),
        past_var_offset=(past, channels),
        mean=(channels,),
        var=(channels,),
    )
    for field, shape in expected.items():
        value = getattr(state, field)
        if tuple(jnp.shape(value)) != shape or not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"`state.{field}` has shape {tuple(jnp.shape(value))} but a kernel of shape "
                f"{kernel_shape} needs a float array of shape {shape}; create the state with "
                f"bnjax.cross_iteration_state({kernel_shape}, window=...)."
            )
    return checks.as_counters(state, ("step", "count", "skipped"), "cross_iteration_state")


def _fan_in_dot(grad: Array, kernel: Array) -> Array:
    """<grad, kernel> per slot and output channel: (past, *K) x K -> (past, C)."""
    return jnp.sum(grad * kernel.astype(grad.dtype), axis=tuple(range(1, grad.ndim - 1)))


def _as_device_varying(kernel: Array, axis_name) -> Array:
    """`kernel` (or a cotangent) typed as differing between the devices of `axis_name`.

    Inside `jax.shard_map` a replicated kernel's cotangent is summed over every device by
    autodiff itself (the transpose of the implicit cast to varying), which would add the
    devices' sums twice and ignore `axis_index_groups`; cast first, so the backward pass stays
    per device and the one explicit psum below does the merge. Under pmap there is no such
    type (nor under vmap with an axis name) and nothing to cast.
    """
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    varying = frozenset(jax.typeof(kernel).mat.varying)
    manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)  # shard_map's axes
    missing = tuple(a for a in axes if a in manual and a not in varying)
    return lax.pcast(kernel, missing, to="varying") if missing else kernel


def _kernel_derivatives(conv, inputs, kernel, centered, valid, count, axis_name, groups):
    """(d mean / d kernel, d var / d kernel) of the current batch: the kernel cotangents of the
    conv for the per-position weights ``valid / n`` and ``2 (y - mean) valid / n``.

    The conv is linear in the kernel, so one backward pass per statistic gives, for every
    output channel j at once, the fan-in vectors E[p] and 2 E[(y_j - mean_j) p]. They run on
    float32 copies (low-precision inputs would round the derivatives), and across devices
    their sums are added before the division by the global count (exact).
    """
    dtype = stats.stats_dtype(jnp.result_type(inputs, kernel))
    inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
    if axis_name is not None:
        kernel = _as_device_varying(kernel, axis_name)
    _, pullback = jax.vjp(lambda w: conv(inputs, w), kernel)
    weights = valid.astype(dtype)
    mean_cotangent, var_cotangent = weights, 2 * centered.astype(dtype) * weights
    if axis_name is not None:  # cotangents typed as the conv's (device-varying) output
        mean_cotangent = _as_device_varying(mean_cotangent, axis_name)
        var_cotangent = _as_device_varying(var_cotangent, axis_name)
    (mean_sum,) = pullback(mean_cotangent)
    (var_sum,) = pullback(var_cotangent)
    if axis_name is not None:
        mean_sum, var_sum = lax.psum((mean_sum, var_sum), axis_name, axis_index_groups=groups)
    safe = jnp.maximum(count, 1)
    return mean_sum / safe, var_sum / safe


def _pooled(mean, var, past_mean, past_var, past_valid):
    """(mu_bar, var_bar): the equal-weight merge of the current and the valid past statistics,
    each past variance clipped at 0 (the paper's max(nu, mu^2))."""
    weights = jnp.concatenate([jnp.ones((1,), mean.dtype), past_valid.astype(mean.dtype)])
    means = jnp.concatenate([mean[None], past_mean])
    variances = jnp.concatenate([var[None], jnp.maximum(past_var, 0)])
    total = jnp.sum(weights)
    pooled_mean = jnp.sum(weights[:, None] * means, axis=0) / total
    spread = jnp.sum(weights[:, None] * stats.abs_square(means - pooled_mean), axis=0) / total
    return pooled_mean, jnp.sum(weights[:, None] * variances, axis=0) / total + spread


def _compensated_past(state: CrossIterationState, kernel: Array, axis_name):
    """Each past slot's (mean, var) carried to the current kernel by its Taylor term.

    ``<grad, W_t - W_past> = <grad, W_t> - offset``: the state keeps the offset, not W_past.
    Inside shard_map a kernel typed device-varying (as a data-parallel step casts its
    parameters for autodiff) makes these (window - 1, C) values varying too, though every
    device has the same ones; one small mean over the devices makes the state replicated.
    """
    mean_shift = _fan_in_dot(state.past_mean_grad, kernel) - state.past_mean_offset
    var_shift = _fan_in_dot(state.past_var_grad, kernel) - state.past_var_offset
    mean_shift, var_shift = _replicated((mean_shift, var_shift), axis_name)
    # var(W) = nu(W) - mu(W)^2 with both Taylor-compensated: exact algebra, stable terms.
    return state.past_mean + mean_shift, state.past_var + var_shift - jnp.square(mean_shift)


def _replicated(values, axis_name):
    """`values` typed as equal on every device of `axis_name` (a pmean where JAX's type says
    they may differ: inside shard_map with a device-varying kernel); unchanged elsewhere."""
    if axis_name is None:
        return values
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

    def replicate(value):
        varying = tuple(a for a in axes if a in frozenset(jax.typeof(value).mat.varying))
        return lax.pmean(value, varying) if varying else value

    return jax.tree.map(replicate, values)


def _check_call(
    inputs,
    kernel,
    state,
    scale,
    bias,
    training,
    momentum,
    epsilon,
    burn_in,
    axis_name,
    axis_index_groups,
):
    inputs, kernel = jnp.asarray(inputs), jnp.asarray(kernel)
    checks.check_floating(inputs, "inputs")
    checks.check_floating(kernel, "kernel")
    if jnp.iscomplexobj(inputs) or jnp.iscomplexobj(kernel):
        raise TypeError("`inputs` and `kernel` must be real: the Taylor terms assume a real W.")
    if kernel.ndim < 2:
        raise ValueError(
            f"`kernel` must have a fan-in and an output-channel axis (last), got shape "
            f"{tuple(kernel.shape)}."
        )
    training = checks.check_training(training)
    checks.check_epsilon(epsilon)
    checks.check_momentum(momentum)
    checks.check_axis_name(axis_name, axis_index_groups)
    state = _check_state(state, tuple(kernel.shape))
    if burn_in is None:
        burn_in = state.window - 1
    burn_in = checks.as_int(burn_in, "burn_in")
    if burn_in < 0:
        raise ValueError(f"`burn_in` must be >= 0 training steps (or None), got {burn_in}.")
    channels = (kernel.shape[-1],)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(
        scale, channels, "scale", "kernel's last axis", input_dtype=inputs.dtype
    )
    checks.check_param_shape(bias, channels, "bias", "kernel's last axis", input_dtype=inputs.dtype)
    return inputs, kernel, state, scale, bias, training, burn_in


def _affine(y, mean, inverse_std, scale, bias):
    """``scale * (y - mean) * inverse_std + bias`` in the statistics dtype, output in y's."""
    dtype = stats.stats_dtype(y.dtype)
    gain = inverse_std if scale is None else inverse_std * scale.astype(dtype)
    out = (y.astype(dtype) - mean) * gain
    if bias is not None:
        out = out + bias.astype(dtype)
    return out.astype(y.dtype)


def cross_iteration_batch_norm(
    inputs: Array,
    kernel: Array,
    state: CrossIterationState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    conv: Callable[[Array, Array], Array] = dense,
    training: bool,
    burn_in: int | None = None,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask: Array | None = None,
) -> tuple[Array, CrossIterationState]:
    """``y = conv(inputs, kernel)`` normalized with cross-iteration statistics (module docstring).

    Args:
      inputs: the layer's input, e.g. (N, H, W, C_in) for a 2-D conv or (N, C_in) for `dense`.
        Any real floating dtype; statistics are float32 (float64 for float64), and the output
        has the conv output's dtype.
      kernel: the layer's kernel, output channels last, e.g. (kh, kw, C_in, C) or (C_in, C).
      state: CrossIterationState for this kernel shape (`cross_iteration_state`); its
        `window` is the k of the paper.
      scale, bias: optional (C,) parameters (None: 1 and 0).
      conv: ``conv(inputs, kernel) -> y`` with channels last, linear in `kernel` (any
        convolution: strides, padding, dilation, groups), e.g. a ``functools.partial`` of
        ``lax.conv_general_dilated``; default `dense`.
      training: True pools the window's statistics (batch norm during burn-in) and updates the
        state; False normalizes with the running statistics and returns `state` unchanged.
      burn_in: training steps of plain batch norm before pooling starts (None: window - 1,
        when the window is first full). The window fills from the first step either way.
      momentum: decay of the running average (None: cumulative average of every batch).
      epsilon: added to the variance before the square root.
      axis_name, axis_index_groups: inside pmap/shard_map, the devices whose batches form the
        global batch: its moments merge exactly (count, mean, m2) and the kernel derivatives
        are means over it, so every device keeps the same state.
      mask: booleans broadcastable to y = conv(inputs, kernel) (per example: (N, 1, ..., 1));
        False positions stay out of the statistics and the derivatives (still normalized).

    Returns:
      (out, new_state), out the shape and dtype of ``conv(inputs, kernel)``. A training batch
      whose statistics are not finite neither enters the window nor the running statistics
      (`skipped` counts it).

    Example:
      >>> kernel = jnp.array([[1.0, 2.0], [0.5, -1.0]])                  # dense 2 -> 2
      >>> state = cross_iteration_state(kernel.shape, window=2)
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
      >>> y, state = cross_iteration_batch_norm(x, kernel, state, training=True, burn_in=0)
      >>> bool(jnp.abs(y.mean(axis=0)).max() < 1e-6), int(state.step)       # one batch so far
      (True, 1)
      >>> y, state = cross_iteration_batch_norm(x, kernel * 1.1, state, training=True)
      >>> # The mean of the first batch, carried to the new kernel, is exact (linear in W):
      >>> bool(jnp.abs(y.mean(axis=0)).max() < 1e-6), state.past_mean_grad.shape
      (True, (1, 2, 2))
    """
    inputs, kernel, state, scale, bias, training, burn_in = _check_call(
        inputs,
        kernel,
        state,
        scale,
        bias,
        training,
        momentum,
        epsilon,
        burn_in,
        axis_name,
        axis_index_groups,
    )
    y = jnp.asarray(conv(inputs, kernel))
    if y.ndim < 1 or y.shape[-1] != kernel.shape[-1]:
        raise ValueError(
            f"`conv` must return channels last ({kernel.shape[-1]} = the kernel's last axis), "
            f"got shape {tuple(y.shape)}."
        )
    dtype = stats.stats_dtype(y.dtype)
    if not training:
        check_known_statistics(state, ("var",), _FUNCTION, finite=False)
        inverse_std = lax.rsqrt(state.var.astype(dtype) + epsilon)
        return _affine(y, state.mean.astype(dtype), inverse_std, scale, bias), state
    reduction_axes = tuple(range(y.ndim - 1))
    if axis_name is None:
        checks.check_not_single_value(
            math.prod(y.shape[:-1]),
            f"{_FUNCTION} in training mode with a conv output of shape {tuple(y.shape)}",
            "Use training=False (running statistics), a larger batch, or axis_name.",
        )
    else:
        stats.check_axis_name_bound(axis_name)
    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    valid = jnp.ones(y.shape, bool) if mask is None else checks.broadcast_mask(mask, y)
    guard = guard_statistics(state, ("mean", "var"), _FUNCTION)
    moments = stats.reduce_moments(
        y, reduction_axes, None if mask is None else valid, axis_name, groups
    )
    count = moments.count.reshape(-1)
    mean, var = moments.mean.reshape(-1), (moments.m2 / jnp.maximum(moments.count, 1)).reshape(-1)

    # The past, carried to the current kernel, enters as constants (the paper's gradients).
    past_mean, past_var = _compensated_past(state, lax.stop_gradient(kernel), axis_name)
    past_valid = jnp.arange(state.window - 1) < state.step
    pooled_mean, pooled_var = _pooled(
        mean, var, lax.stop_gradient(past_mean), lax.stop_gradient(past_var), past_valid
    )
    pooling = state.step >= burn_in
    use_mean = jnp.where(pooling, pooled_mean, mean)
    use_var = jnp.where(pooling, pooled_var, var)
    out = _affine(y, use_mean, stats.inverse_root(count, use_var, epsilon), scale, bias)

    # The new state: this batch enters the window (newest first) and the running statistics.
    mean, var, use_mean, use_var = (lax.stop_gradient(a) for a in (mean, var, use_mean, use_var))
    centered = lax.stop_gradient(y.astype(dtype) - mean)
    mean_grad, var_grad = _kernel_derivatives(
        conv,
        lax.stop_gradient(inputs),
        lax.stop_gradient(kernel),
        centered,
        valid,
        count,
        axis_name,
        groups,
    )
    mean_offset, var_offset = _replicated(
        _fan_in_dot(jnp.stack([mean_grad, var_grad]), lax.stop_gradient(kernel)), axis_name
    )
    # A batch with non-finite statistics would spoil the next window - 1 steps: left out.
    entering = jnp.all(jnp.isfinite(jnp.stack([mean, var])))
    entering &= jnp.all(jnp.isfinite(mean_grad)) & jnp.all(jnp.isfinite(var_grad))

    def push(past, new):
        new = new.astype(past.dtype)[None]
        shifted = jnp.concatenate([new, past[:-1]]) if past.shape[0] else past
        return jnp.where(entering, shifted, past)

    window = dict(
        past_mean=push(state.past_mean, mean),
        past_var=push(state.past_var, var),
        past_mean_grad=push(state.past_mean_grad, mean_grad),
        past_var_grad=push(state.past_var_grad, var_grad),
        past_mean_offset=push(state.past_mean_offset, mean_offset),
        past_var_offset=push(state.past_var_offset, var_offset),
        step=state.step + entering.astype(jnp.int32),
    )
    update = BatchUpdate(use_mean, use_var, count >= MIN_VALUES_PER_ESTIMATE)
    new_state = running_update(state, update, momentum, guard)
    return out, new_state._replace(**window)
