"""Moments: stable per-channel mean and variance, masks, and exact merging across devices.

A set of values is summarised by its sufficient statistics ``Moments(count, mean, m2)`` where
``m2 = sum_i (x_i - mean)^2``. Two summaries merge exactly (Chan et al., 1979):

    n = n_a + n_b
    mean = (n_a * mean_a + n_b * mean_b) / n
    m2 = m2_a + m2_b + n_a * (mean_a - mean)^2 + n_b * (mean_b - mean)^2

so shards with different numbers of valid values (masks, a ragged last batch) still give the
exact global moments, and no step ever forms ``E[x^2] - E[x]^2``, which loses every digit when
``|mean| >> std`` (at mean/std = 1000, float32 keeps about one correct digit of the variance).

Moments are computed with two passes over the data: the mean, then the squared deviations
from it. `centered_moments` (batch norm's statistics on one device) sums the mean around the
median of three values of the data, ``mean = s + sum(x - s) / n``: exact for a constant
channel and within about an ulp at |mean| = 1000 std. On XLA:CPU both passes fuse into plain
reductions, each as fast as one of the two reductions of the one-pass ``E[x^2] - E[x]^2``
(which XLA:CPU does not fuse into one read of x either), and the result is within float32
rounding of a float64 reference. Across devices
(`reduce_moments` with an `axis_name`) each device summarises x minus one of its own values
and one collective gathers the summaries (`merge_across_devices`), which every device merges.

References:
  Chan, Golub & LeVeque (1979), Updating Formulae and a Pairwise Algorithm for Computing
  Sample Variances, Stanford report STAN-CS-79-773.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "Moments",
    "abs_square",
    "centered_moments",
    "check_axis_name_bound",
    "combine",
    "inverse_root",
    "mean_square",
    "merge_across_devices",
    "moments",
    "real_dtype",
    "reduce_moments",
    "shifted_moments",
    "stats_dtype",
]

Array = jax.Array


class Moments(NamedTuple):
    """Sufficient statistics of a set of values; all fields have the same (broadcast) shape.

    Attributes:
      count: number of valid values summarised (float, so masks and merges stay exact to 2^24).
      mean: their mean (0 where count is 0).
      m2: sum of squared deviations from `mean` (0 where count is 0).

    Example:
      >>> a = moments(jnp.array([1.0, 2.0]), (0,))            # count 2, mean 1.5, m2 0.5
      >>> b = moments(jnp.array([3.0, 6.0]), (0,))            # count 2, mean 4.5, m2 4.5
      >>> total = combine(jax.tree.map(lambda *m: jnp.stack(m), a, b))   # = of [1, 2, 3, 6]
      >>> [float(v[0]) for v in total], float(total.variance()[0])
      ([4.0, 3.0, 14.0], 3.5)
    """

    count: Array
    mean: Array
    m2: Array

    def variance(self, unbiased: bool = False) -> Array:
        """Biased ``m2 / n`` or unbiased ``m2 / (n - 1)`` variance (inf/nan when undefined)."""
        denominator = self.count - 1 if unbiased else self.count
        return self.m2 / denominator


def stats_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are computed in: float32, or float64 for float64 inputs (complex64
    or complex128 for complex inputs; their variances are real)."""
    return jnp.promote_types(dtype, jnp.float32)


def abs_square(x: Array) -> Array:
    """``|x|^2``, real for complex `x` (the square of a real `x`)."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype of a (possibly complex) statistics dtype: counts and variances."""
    return jnp.finfo(dtype).dtype


def inverse_root(count: Array, value: Array, epsilon) -> Array:
    """``1 / sqrt(value + epsilon)`` per statistic, and 0 where `count` is 0.

    `value` is a variance or a mean square over `count` valid values. A statistic with no
    valid value (everything masked, an empty shard) normalizes its values to 0, so the output
    there is the bias and the gradient 0, never NaN; ``rsqrt(0 + epsilon)`` would instead
    blow those values up by ``1 / sqrt(epsilon)``. Every division by statistics of the
    current input (batch, group, layer, instance, RMS) goes through here.
    """
    return jnp.where(count > 0, lax.rsqrt(value + epsilon), 0)


def moments(x: Array, reduction_axes: tuple[int, ...], mask: Array | None = None) -> Moments:
    """Per-channel moments of `x` over `reduction_axes`, in float32 (float64 for float64 `x`).

    Args:
      x: any floating array.
      reduction_axes: axes to reduce; the results keep them as size-1 dims.
      mask: optional boolean array broadcastable to `x`; False entries are left out.
        Masked-out entries may hold anything, even NaN: they are selected away, not multiplied.

    Returns:
      Moments with shape `x.shape` where every reduced axis has size 1.
    """
    return _two_pass(x, reduction_axes, mask, centered=False)


def centered_moments(
    x: Array, reduction_axes: tuple[int, ...], mask: Array | None = None
) -> Moments:
    """`moments`, with the mean summed around a value of the data: ``s + sum(x - s) / n``.

    s is the median of the first, middle and last value of each statistic (`_median_of_three`),
    so a constant channel has its mean, a variance of 0 and ``x - mean = 0`` exactly, and at
    |mean| = 1000 std the mean is within about an ulp of |mean| (the plain float32 sum of x is
    several ulps off: 70 for 1024 copies of 1000.1, which a normalization then divides by
    ``sqrt(var + epsilon)``). The variance is two-pass around that mean either way. Same
    arguments and result as `moments`; the cost is one subtraction per value in the first pass.

    Example:
      >>> m = centered_moments(jnp.full((1024, 1), 1000.1), (0,))
      >>> bool(m.mean[0, 0] == jnp.float32(1000.1)), float(m.m2[0, 0])
      (True, 0.0)
    """
    return _two_pass(x, reduction_axes, mask, centered=True)


def _two_pass(x, reduction_axes, mask, *, centered: bool) -> Moments:
    dtype = stats_dtype(x.dtype)
    x = x.astype(dtype)
    if mask is None:
        count = 1
        for axis in reduction_axes:
            count *= x.shape[axis]
        # sum / max(count, 1), not jnp.mean: an empty reduction (a ragged last shard of size 0)
        # must give mean 0 with count 0, which merges as a neutral element instead of NaN.
        if centered:
            shift = lax.stop_gradient(_median_of_three(x, reduction_axes))
            total = jnp.sum(x - shift, axis=reduction_axes, keepdims=True)
            mean = shift + total / max(count, 1)
        else:
            mean = jnp.sum(x, axis=reduction_axes, keepdims=True) / max(count, 1)
        m2 = jnp.sum(abs_square(x - mean), axis=reduction_axes, keepdims=True)
        return Moments(jnp.full(mean.shape, count, real_dtype(dtype)), mean, m2)
    mask = jnp.broadcast_to(mask, x.shape)
    # Select masked entries away before any arithmetic: `where` after `square` would still
    # send 0 * NaN = NaN into the gradient of every entry through the mean.
    x = jnp.where(mask, x, 0)
    count = jnp.sum(mask, axis=reduction_axes, keepdims=True, dtype=real_dtype(dtype))
    safe_count = jnp.maximum(count, 1)
    if centered:
        # The shift's three values may be masked out: they are 0 then (x is selected above),
        # so the shift is a valid value or 0, and 0 where no value is valid (mean 0 there).
        shift = lax.stop_gradient(_median_of_three(x, reduction_axes))
        total = jnp.sum(jnp.where(mask, x - shift, 0), axis=reduction_axes, keepdims=True)
        mean = shift + total / safe_count
    else:
        mean = jnp.sum(x, axis=reduction_axes, keepdims=True) / safe_count
    m2 = jnp.sum(jnp.where(mask, abs_square(x - mean), 0), axis=reduction_axes, keepdims=True)
    return Moments(count, mean, m2)


def _sharded_axes(x: Array) -> set[int]:
    """The axes of `x` split over devices in its type (explicit sharding under jit): a slice of
    one value along them is not defined there."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return {axis for axis, entry in enumerate(spec or ()) if entry is not None}


def _median_of_three(x: Array, reduction_axes: tuple[int, ...]) -> Array:
    """Per statistic, the median of the first, middle and last value over `reduction_axes`;
    0 for complex `x`, an empty reduction, or a reduction axis split over devices in x's type.
    The reduced axes are kept as size-1 dims.

    Three values, not one: the median ignores one outlier (e.g. the first value), which as the
    shift would make the sum's rounding worse than no shift. The slices fuse into one small
    loop; no pass over x.
    """
    shape = tuple(1 if a in reduction_axes else n for a, n in enumerate(x.shape))
    if (
        jnp.iscomplexobj(x)
        or any(x.shape[a] == 0 for a in reduction_axes)
        or _sharded_axes(x) & set(reduction_axes)
    ):
        return jnp.zeros(shape, x.dtype)

    def at(position):
        index = tuple(
            slice(position(x.shape[a]), position(x.shape[a]) + 1)
            if a in reduction_axes
            else slice(None)
            for a in range(x.ndim)
        )
        return x[index]

    first, middle, last = at(lambda n: 0), at(lambda n: n // 2), at(lambda n: n - 1)
    low, high = jnp.minimum(first, middle), jnp.maximum(first, middle)
    return jnp.maximum(low, jnp.minimum(high, last))


def combine(stacked: Moments, axis: int = 0) -> Moments:
    """Merges moments stacked along `axis` into one summary, exactly (see module docstring)."""
    count = jnp.sum(stacked.count, axis=axis)
    safe_count = jnp.maximum(count, 1)
    mean = jnp.sum(stacked.count * stacked.mean, axis=axis) / safe_count
    deviation = stacked.mean - jnp.expand_dims(mean, axis)
    m2 = jnp.sum(stacked.m2 + stacked.count * abs_square(deviation), axis=axis)
    return Moments(count, mean, m2)


def _shift(x: Array, reduction_axes: tuple[int, ...], mask: Array | None) -> Array:
    """One valid value of `x` per statistic (the first), 0 where there is none.

    A value of the data itself, not a computed mean: XLA may contract ``x - sum / n`` into a
    fused multiply-add, so a computed mean sent to other devices and the one the local
    deviations were measured against can differ in the last bit; a loaded value cannot.
    Without a mask it is a slice; with one, two fused reductions pick the first valid value
    (its row-major position among the reduction axes), with no transposed copy of x.
    """
    shape = tuple(1 if a in reduction_axes else n for a, n in enumerate(x.shape))
    if any(x.shape[a] == 0 for a in reduction_axes):
        return jnp.zeros(shape, x.dtype)
    if mask is None:
        return x[tuple(slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.ndim))]
    mask = jnp.broadcast_to(mask, x.shape)
    position, stride = jnp.zeros(x.shape, jnp.int32), 1
    for axis in reversed(reduction_axes):
        position = position + lax.broadcasted_iota(jnp.int32, x.shape, axis) * stride
        stride *= x.shape[axis]
    first = jnp.min(jnp.where(mask, position, stride), axis=reduction_axes, keepdims=True)
    chosen = mask & (position == first)
    # A sum of one value and zeros: that value, exactly (0 where no value is valid).
    return jnp.sum(jnp.where(chosen, x, 0), axis=reduction_axes, keepdims=True)


def shifted_moments(
    x: Array, reduction_axes: tuple[int, ...], mask: Array | None = None
) -> tuple[Array, Moments]:
    """(shift, Moments of x - shift) over `reduction_axes`, two-pass, in the statistics dtype.

    The shift is one value of the data per statistic (`_shift`), so the moments of the
    differences are small numbers that stay exact even when |mean| >> std, and the true mean is
    ``shift + moments.mean`` to about twice float32's precision. `merge_across_devices` needs
    that to merge devices as exactly as one pass over all their data.
    """
    dtype = stats_dtype(x.dtype)
    x = x.astype(dtype)
    shift = lax.stop_gradient(_shift(x, reduction_axes, mask))
    return shift, moments(x - shift, reduction_axes, mask)


def _gather_by_sum(parts: Array, axis_name, axis_index_groups) -> Array:
    """Every device's `parts`, stacked along a new leading axis, by one `psum`.

    Each device writes its parts into its own slot of zeros and the slots are summed: the
    result of an all-gather, as an all-reduce. XLA combines independent all-reduces (of the
    layers of a residual block, of the gradients) into one, which it does not do for
    all-gathers; and a psum's result is replicated, so under shard_map the merged moments can
    leave with out_specs=P(). With `axis_index_groups` the slots are positions in the group.
    """
    index = lax.axis_index(axis_name)
    size = lax.axis_size(axis_name)
    if axis_index_groups is not None:
        position = [0] * size
        for group in axis_index_groups:
            for slot, device in enumerate(group):
                position[device] = slot
        index = jnp.asarray(position, jnp.int32)[index]
        size = len(axis_index_groups[0])
    slots = jnp.zeros((size, *parts.shape), parts.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, parts, index, axis=0)
    return lax.psum(slots, axis_name, axis_index_groups=axis_index_groups)


def merge_across_devices(
    local: Moments, axis_name, axis_index_groups=None, shift: Array | None = None
) -> Moments:
    """Exact global moments from per-device moments inside `pmap`/`shard_map`, in one round.

    One collective gathers each device's (count, shift, mean, m2), the statistics' size times
    the number of devices (not the data's), then Chan's merge runs on every device, so the
    result is replicated over `axis_name`. With the shifted moments of `shifted_moments`
    (`local` describes x - shift), every device's mean is measured against the shift of the
    device with the most values from small, exact differences, so the result is as accurate
    as one two-pass reduction over all the data, also at |mean| = 10^4 std (merging rounded
    means alone leaves a relative variance error of about 1e-4 there).
    """
    if shift is None:
        shift = jnp.zeros_like(local.mean)
    dtype = jnp.result_type(local.mean, local.m2, shift)
    parts = jnp.stack([local.count, shift, local.mean, local.m2]).astype(dtype)
    gathered = _gather_by_sum(parts, axis_name, axis_index_groups)
    count, shifts, means, m2 = (gathered[:, i] for i in range(4))
    count, m2 = count.real, m2.real
    reference = jnp.take_along_axis(shifts, jnp.argmax(count, axis=0)[None], axis=0)
    deviation = (shifts - reference) + means  # small: the shifts agree in their high bits
    total = jnp.sum(count, axis=0)
    offset = jnp.sum(count * deviation, axis=0) / jnp.maximum(total, 1)
    m2 = jnp.sum(m2 + count * abs_square(deviation - offset), axis=0)
    return Moments(total, reference[0] + offset, m2)


def reduce_moments(
    x: Array,
    reduction_axes: tuple[int, ...],
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> Moments:
    """`moments` of `x` over `reduction_axes`, merged exactly over `axis_name` when given."""
    if axis_name is None:
        return moments(x, reduction_axes, mask)
    check_axis_name_bound(axis_name)
    shift, local = shifted_moments(x, reduction_axes, mask)
    return merge_across_devices(local, axis_name, axis_index_groups, shift)


def mean_square(
    x: Array,
    reduction_axes: tuple[int, ...],
    mask: Array | None = None,
    axis_name=None,
    axis_index_groups=None,
) -> tuple[Array, Array]:
    """``sum |x|^2 / n`` over `reduction_axes` (kept as size-1 dims) and over the devices of
    `axis_name`, with n the number of valid values; in the statistics dtype's real type.

    A sum of non-negative terms loses no digits, so counts and sums merge directly (one psum
    of both); devices with different numbers of valid values still give the exact result.
    Returns (count, mean square); the mean square is 0 where the count is 0.
    """
    dtype = stats_dtype(x.dtype)
    squares = abs_square(x.astype(dtype))
    if mask is None:
        count = jnp.full((), math.prod(x.shape[a] for a in reduction_axes), squares.dtype)
        total = jnp.sum(squares, axis=reduction_axes, keepdims=True)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(mask, axis=reduction_axes, keepdims=True, dtype=squares.dtype)
        total = jnp.sum(jnp.where(mask, squares, 0), axis=reduction_axes, keepdims=True)
    if axis_name is not None:
        check_axis_name_bound(axis_name)
        count, total = lax.psum((count, total), axis_name, axis_index_groups=axis_index_groups)
    return count, total / jnp.maximum(count, 1)


def _mapped_axes() -> tuple[str, ...]:
    """The names of the pmap/shard_map axes bound where this is traced (vmap's are not
    listed: JAX keeps them in no public place)."""
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def check_axis_name_bound(axis_name) -> None:
    """Turns JAX's unbound-axis NameError into an error that names the axis, the mapped axes
    that are bound, and what to do."""
    try:
        lax.axis_size(axis_name)
    except NameError as error:
        bound = _mapped_axes()
        if bound:
            where = f"the pmap/shard_map axes bound here are {', '.join(map(repr, bound))}"
            fix = "name one of those, or call"
        else:
            where, fix = "no pmap/shard_map axis is bound here", "call"
        raise ValueError(
            f"`axis_name`={axis_name!r} is not bound here ({where}): {fix} the normalizer "
            f"inside `jax.pmap(..., axis_name={axis_name!r})` or `jax.shard_map` over a mesh "
            f"axis of that name, or pass axis_name=None for per-device statistics."
        ) from error
