"""Batch normalization at test time: statistics of a test stream instead of the training set.

A trained batch norm normalizes with its running statistics (mu_s, var_s) of the training
(source) data. When the serving distribution shifts they are stale; normalizing each test batch
with its own statistics (prediction-time batch norm, Nado et al. 2020; what TENT adapts on)
repairs a covariate shift, but only when the batch is large and i.i.d.: a batch of one class,
or of one example, has statistics that belong to no population. Two estimators here follow the
stream instead, per feature c (shapes: x (N, ..., C) with `axis=-1`, statistics (C,)):

**Test-time batch renormalization** (DELTA, Zhao et al. 2023, Sec. 3.2, "TBR"). The state
holds moving averages mu_ema, sigma_ema of the batch means and standard deviations. With the
batch's mu_b and sigma_b = sqrt(var_b + epsilon), and sg the stop-gradient,

    r = sg(sigma_b) / sigma_ema,        d = (sg(mu_b) - mu_ema) / sigma_ema
    x_hat = (x - mu_b) / sigma_b * r + d
    y = scale * x_hat + bias
    mu_ema <- a * mu_ema + (1 - a) * sg(mu_b),   sigma_ema <- a * sigma_ema + (1 - a) * sg(sigma_b)

(a = `momentum`). The forward value is ``(x - mu_ema) / sigma_ema``, the statistics of many
past batches, while the gradient is that of batch normalization (through mu_b and sigma_b), as
in batch renormalization (Ioffe 2017) without its clipping. A state that is not yet
initialized (`stream_renorm_state` of a feature count) takes the first batch's statistics,
as DELTA does; `stream_renorm_state_from` starts from the source statistics instead.

**Streaming population statistics** (AdaBN, Li et al. 2016, applied online). The state is the
exact sufficient statistics ``Moments(count, mean, m2)`` of every test value seen so far, plus
an optional source prior of `count` pseudo-values with the source mean and variance (as in
Schneider et al. 2020's ``N / (N + n)`` blend, but merged as a mixture: the spread of the two
means enters the variance). Each batch is merged in exactly (Chan et al.) and normalizes with
the merged mean and variance:

    (n, mu, m2) <- merge((n, mu, m2), moments of x),      x_hat = (x - mu) / sqrt(m2 / n + eps)

Statistics are float32 (float64 for float64 inputs) whatever x's dtype; y has x's dtype. A
batch whose statistics are not finite updates no state (the state is returned unchanged and
its output is what it is), so one bad input cannot poison the estimates of later batches.

References:
  Zhao, Liu, Li, Ding, Sun & Wang (2023), DELTA: Degradation-free fully test-time adaptation,
  ICLR 2023, arXiv:2301.13018 (TBR, Sec. 3.2; DOT, Sec. 3.3).
  Ioffe (2017), Batch Renormalization, arXiv:1702.03275 (Algorithm 1: r and d).
  Li, Wang, Shi, Liu & Hou (2016), Revisiting Batch Normalization For Practical Domain
  Adaptation, arXiv:1603.04779 (AdaBN).
  Schneider, Rusak, Eck, Bringmann, Brendel & Bethge (2020), Improving robustness against
  common corruptions by covariate shift adaptation, NeurIPS 2020 (the source prior).
  Nado, Padhy, Sculley, D'Amour, Lakshminarayanan & Snoek (2020), Evaluating
  prediction-time batch normalization for robustness under covariate shift, arXiv:2006.10963.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats

__all__ = [
    "StreamRenormState",
    "stream_batch_renorm",
    "stream_renorm_state",
    "stream_renorm_state_from",
    "streaming_population_norm",
    "streaming_population_state",
]

Array = jax.Array


class StreamRenormState(NamedTuple):
    """The moving test statistics of `stream_batch_renorm` (a pytree).

    Attributes:
      mean: mu_ema, the feature shape (e.g. (C,)), float32 (float64 under x64).
      std: sigma_ema = a moving average of sqrt(var_b + epsilon), same shape.
      count: int32 scalar, test batches merged (0: not initialized; the next batch sets both).

    Example:
      >>> state = stream_renorm_state_from(jnp.zeros(2), jnp.full(2, 3.75), epsilon=0.25)
      >>> state.std.tolist(), int(state.count)
      ([2.0, 2.0], 1)
    """

    mean: Array
    std: Array
    count: Array


def _feature_shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(num_features, (list, tuple)):
        return tuple(checks.as_int(n, "num_features") for n in num_features)
    return (checks.as_int(num_features, "num_features"),)


def stream_renorm_state(num_features: int | Sequence[int], dtype=None) -> StreamRenormState:
    """An uninitialized state: the first batch's statistics become mu_ema and sigma_ema (DELTA).

    Example:
      >>> state = stream_renorm_state(3)
      >>> state.mean.shape, int(state.count)
      ((3,), 0)

    Args:
      num_features: channels C, or the feature shape for several feature axes.
      dtype: statistics dtype, float32 by default (float64 under x64).
    """
    shape = _feature_shape(num_features)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    return StreamRenormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.int32(0))


def stream_renorm_state_from(mean, var, *, epsilon: float = 1e-5) -> StreamRenormState:
    """A state that starts from given statistics (a trained layer's running mean and variance):
    mu_ema = mean, sigma_ema = sqrt(var + epsilon), counted as one batch.

    Starting from the source statistics (rather than the first test batch, as DELTA does)
    keeps a stream that begins with one class from setting every estimate to that class.

    Example:
      >>> state = stream_renorm_state_from(jnp.ones(2), jnp.full(2, 3.75), epsilon=0.25)
      >>> state.mean.tolist(), state.std.tolist()
      ([1.0, 1.0], [2.0, 2.0])
    """
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    checks.check_floating(mean, "mean")
    checks.check_floating(var, "var")
    checks.check_epsilon(epsilon)
    if mean.shape != var.shape:
        raise ValueError(
            f"`mean` and `var` must have the same (feature) shape, got {mean.shape} and "
            f"{var.shape}."
        )
    dtype = stats.stats_dtype(mean.dtype)
    std = jnp.sqrt(var.astype(dtype) + epsilon)
    return StreamRenormState(mean.astype(dtype), std, jnp.int32(1))


class _Call(NamedTuple):
    x: Array
    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    scale: Array | None
    bias: Array | None
    mask: Array | None


def _check_call(x, scale, bias, epsilon, axis, mask, axis_name, axis_index_groups) -> _Call:
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    checks.check_epsilon(epsilon)
    checks.check_axis_name(axis_name, axis_index_groups)
    feature_axes = checks.normalize_axes(axis, x.ndim, "axis")
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    scale, bias = checks.as_param(scale, "scale"), checks.as_param(bias, "bias")
    checks.check_param_shape(scale, feature_shape, "scale", "axis", input_dtype=x.dtype)
    checks.check_param_shape(bias, feature_shape, "bias", "axis", input_dtype=x.dtype)
    return _Call(
        x,
        feature_axes,
        reduction_axes,
        feature_shape,
        scale,
        bias,
        checks.broadcast_mask(mask, x),
    )


def _view(call: _Call, value: Array) -> Array:
    """A feature-shaped array reshaped to broadcast against x."""
    shape = [1] * call.x.ndim
    for axis in call.feature_axes:
        shape[axis] = call.x.shape[axis]
    return value.reshape(shape)


def _features(call: _Call, value: Array) -> Array:
    """A keepdims statistic (x.ndim dims, 1 on the reduced axes) in the feature shape."""
    return value.reshape(call.feature_shape)


def _affine(call: _Call, x_hat: Array) -> Array:
    y = x_hat
    if call.scale is not None:
        y = y * _view(call, call.scale.astype(y.dtype))
    if call.bias is not None:
        y = y + _view(call, call.bias.astype(y.dtype))
    return y.astype(call.x.dtype)


def _check_state_shape(value: Array, call: _Call, argument: str) -> None:
    if tuple(value.shape) != call.feature_shape:
        raise ValueError(
            f"`{argument}` has statistics of shape {tuple(value.shape)} but x has features "
            f"of shape {call.feature_shape} along `axis`; make the state with "
            f"{call.feature_shape} features."
        )


def _all_finite(*values: Array) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))


def stream_batch_renorm(
    x: Array,
    state: StreamRenormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    momentum: float = 0.95,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> tuple[Array, StreamRenormState]:
    """Test-time batch renormalization (DELTA's TBR; equations in the module docstring).

    Args:
      x: input, e.g. (N, H, W, C) with `axis=-1`; any floating dtype (`y` has it).
      state: `StreamRenormState` of the feature shape; count 0 means "start from this
        batch".
      scale, bias: optional parameters of the feature shape (None: 1 and 0).
      momentum: a, the decay of the moving averages (DELTA uses 0.95), in [0, 1].
      epsilon: added to the batch variance before the square root.
      axis: feature axis or axes (statistics are per feature, reduced over the others).
      mask: optional boolean, broadcast against x as in flax: the values that enter the batch
        statistics.
      axis_name, axis_index_groups: merge the batch statistics over devices (`pmap`,
        `shard_map`), exactly.

    Returns:
      (y, new_state): y = scale * (x - mu_ema) / sigma_ema + bias in value, with batch
      normalization's gradient; the state with this batch merged (unchanged if the batch's
      statistics are not finite).

    Example:
      >>> x = jnp.array([[1.5], [2.5]])              # mu_b = 2, sigma_b = sqrt(0.25 + 0.75) = 1
      >>> state = stream_renorm_state_from(jnp.zeros(1), jnp.full(1, 0.25), epsilon=0.75)
      >>> y, state = stream_batch_renorm(x, state, momentum=0.5, epsilon=0.75)
      >>> y[:, 0].tolist(), state.mean.tolist(), state.std.tolist()   # normalized by (0, 1)
      ([1.5, 2.5], [1.0], [1.0])
    """
    checks.check_momentum(momentum, allow_none=False)
    call = _check_call(x, scale, bias, epsilon, axis, mask, axis_name, axis_index_groups)
    _check_state_shape(state.mean, call, "state")
    _check_state_shape(state.std, call, "state")
    moments = stats.reduce_moments(
        call.x, call.reduction_axes, call.mask, axis_name, axis_index_groups
    )
    batch_mean = moments.mean
    batch_std = jnp.sqrt(moments.m2 / jnp.maximum(moments.count, 1) + epsilon)
    dtype = batch_mean.dtype
    initialized = state.count > 0
    # The first batch of an uninitialized state is its own reference: r = 1, d = 0.
    ema_mean = jnp.where(initialized, _view(call, state.mean.astype(dtype)), batch_mean)
    ema_std = jnp.where(initialized, _view(call, state.std.astype(dtype)), batch_std)
    r = lax.stop_gradient(batch_std) / ema_std
    d = (lax.stop_gradient(batch_mean) - ema_mean) / ema_std
    x_hat = (call.x.astype(dtype) - batch_mean) / batch_std * r + d
    y = _affine(call, x_hat)

    new_mean = momentum * ema_mean + (1 - momentum) * lax.stop_gradient(batch_mean)
    new_std = momentum * ema_std + (1 - momentum) * lax.stop_gradient(batch_std)
    finite = _all_finite(batch_mean, batch_std)
    new_state = StreamRenormState(
        mean=jnp.where(finite, _features(call, new_mean), state.mean).astype(state.mean.dtype),
        std=jnp.where(finite, _features(call, new_std), state.std).astype(state.std.dtype),
        count=jnp.where(finite, state.count + 1, state.count).astype(jnp.int32),
    )
    return y, new_state


def streaming_population_state(
    mean=None, var=None, *, prior_count: float = 0.0, num_features=None, dtype=None
) -> stats.Moments:
    """The state of `streaming_population_norm`: ``Moments`` of the feature shape.

    With `mean` and `var` (a trained layer's running statistics) and `prior_count` > 0 the
    source enters as `prior_count` pseudo-values with that mean and variance (the weight of
    the source against the test values seen); with `prior_count` = 0 (default) or no
    statistics the estimate is the test stream's alone (give `num_features` then).

    Example:
      >>> prior = streaming_population_state(jnp.zeros(1), jnp.ones(1), prior_count=10.0)
      >>> [float(v[0]) for v in prior]                           # count, mean, m2
      [10.0, 0.0, 10.0]
    """
    checks.check_in_range(prior_count, "prior_count", 0.0)
    if mean is None:
        if num_features is None:
            raise ValueError("Give `mean` and `var` (a source prior) or `num_features`.")
        shape = _feature_shape(num_features)
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
        zeros = jnp.zeros(shape, dtype)
        return stats.Moments(zeros, zeros, zeros)
    if var is None:
        raise ValueError("`var` is missing: give the source mean and variance together.")
    mean, var = jnp.asarray(mean), jnp.asarray(var)
    checks.check_floating(mean, "mean")
    checks.check_floating(var, "var")
    if mean.shape != var.shape:
        raise ValueError(
            f"`mean` and `var` must have the same (feature) shape, got {mean.shape} and "
            f"{var.shape}."
        )
    dtype = stats.stats_dtype(mean.dtype)
    count = jnp.full(mean.shape, prior_count, dtype)
    return stats.Moments(count, mean.astype(dtype), var.astype(dtype) * count)


def streaming_population_norm(
    x: Array,
    state: stats.Moments,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> tuple[Array, stats.Moments]:
    """Normalization with the exact statistics of the stream so far, this batch included.

    Args:
      x: input, e.g. (N, H, W, C) with `axis=-1`; any floating dtype (`y` has it).
      state: ``Moments`` of the feature shape (`streaming_population_state`).
      scale, bias: optional parameters of the feature shape (None: 1 and 0).
      epsilon: added to the variance before the square root.
      axis: feature axis or axes.
      mask: optional boolean, broadcast against x: the values that enter the statistics.
      axis_name, axis_index_groups: merge the batch statistics over devices, exactly.

    Returns:
      (y, new_state): y normalized with the merged mean and biased variance; the merged
      moments (the input state when this batch's statistics are not finite).

    Example:
      >>> state = streaming_population_state(num_features=1)
      >>> _, state = streaming_population_norm(jnp.array([[0.0], [2.0]]), state)
      >>> _, state = streaming_population_norm(jnp.array([[4.0], [6.0]]), state)
      >>> float(state.mean[0]), float(state.variance()[0])          # of [0, 2, 4, 6]
      (3.0, 5.0)
    """
    call = _check_call(x, scale, bias, epsilon, axis, mask, axis_name, axis_index_groups)
    for field in state:
        _check_state_shape(field, call, "state")
    batch = stats.reduce_moments(
        call.x, call.reduction_axes, call.mask, axis_name, axis_index_groups
    )
    dtype = batch.mean.dtype
    batch = stats.Moments(*(_features(call, v) for v in batch))
    prior = stats.Moments(*(v.astype(dtype) for v in state))
    merged = stats.combine(jax.tree.map(lambda a, b: jnp.stack([a, b]), prior, batch))
    finite = _all_finite(*batch)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), merged, prior)
    variance = merged.m2 / jnp.maximum(merged.count, 1)
    inv = stats.inverse_root(merged.count, variance, epsilon)
    x_hat = (call.x.astype(dtype) - _view(call, merged.mean)) * _view(call, inv)
    y = _affine(call, x_hat)
    return y, stats.Moments(*(v.astype(o.dtype) for v, o in zip(new_state, state, strict=True)))
