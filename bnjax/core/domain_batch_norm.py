"""Domain-specific batch normalization: one set of running statistics per domain.

Every example n carries an integer domain index d_n in [0, D) (clean or adversarial, source or
target, client or silo). In training, domain d is normalized with the statistics of its own
valid examples only, per channel c, over the batch and the spatial axes:

    B_d = {n : d_n = d and mask_n}                      (the examples of domain d)
    mu_dc = sum_{n in B_d, s} x_nsc / n_dc              (n_dc: number of values of B_d in c)
    var_dc = sum_{n in B_d, s} (x_nsc - mu_dc)^2 / n_dc (biased, as batch norm)
    y_nsc = scale_(d_n)c * (x_nsc - mu_(d_n)c) / sqrt(var_(d_n)c + epsilon) + bias_(d_n)c

Evaluation uses the running statistics of each example's domain instead. Each domain keeps
its own running average (momentum = decay, flax's convention; None: cumulative average over
the batches in which that domain appeared):

    running_d = momentum * running_d + (1 - momentum) * batch_d       (domains in the batch)
    running_d unchanged                                               (domains not in it)

`scale` and `bias` are shared, shape (C,) (SiloBN's and AdvProp-as-a-mixture's choice), or per
domain, shape (D, C) (DSBN's gamma_d, beta_d; FedBN keeps them local, AdvProp's auxiliary BN
has its own).

How it is computed: each example is summarised over its spatial positions (two-pass
`stats.moments`: count, mean, M2 per channel), then the summaries of each domain's examples
merge exactly (`stats.combine`, Chan et al.), and across devices with
`stats.merge_across_devices` (counts included: a device without examples of domain d adds
nothing to it). The normalization reads each example's row of the (D, C) statistics. That is
two passes over x, as batch norm, plus merges over (N, D, C) summaries; the gradient is
autodiff of these steps. The running update reuses batch norm's (`batch_statistics_for_update`:
per-feature guard, ghost batches), per domain. With one domain it is `batch_norm` itself.

References:
  Chang, You, Seo, Kwak & Han (2019), Domain-Specific Batch Normalization for Unsupervised
  Domain Adaptation, CVPR, arXiv:1906.03950 (Section 3.2, Eq. (2): per-domain statistics and
  per-domain gamma_d, beta_d).
  Xie, Tan, Gong, Wang, Yuille & Le (2020), Adversarial Examples Improve Image Recognition,
  CVPR, arXiv:1911.09665 (AdvProp, Section 3 and Algorithm 1: a main BN for clean and an
  auxiliary BN for adversarial examples; only the main BN at test time).
  Li, Jiang, Zhang, Kamp & Dou (2021), FedBN: Federated Learning on Non-IID Features via
  Local Batch Normalization, ICLR, arXiv:2102.07623 (Algorithm 1: BN layers never averaged).
  Andreux, du Terrail, Beguier & Tramel (2020), Siloed Federated Learning for Multi-Centric
  Histopathology Datasets, DART workshop, arXiv:2008.07424 (SiloBN: statistics local to each
  silo, affine parameters shared).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.core import checks, stats
from bnjax.core.batch_layout import batch_layout
from bnjax.core.batch_norm import BatchNormState, batch_norm, batch_norm_state, plan_training
from bnjax.core.domain_checks import check_domain, check_param, check_state
from bnjax.core.running_update import batch_statistics_for_update, updated_statistics
from bnjax.core.state_guard import check_known_statistics, guard_statistics

__all__ = [
    "DomainBatchNormState",
    "domain_batch_norm",
    "domain_batch_norm_state",
    "domain_moments",
]

Array = jax.Array
_FUNCTION = "domain_batch_norm"


class DomainBatchNormState(NamedTuple):
    """Running statistics of a domain-specific batch norm, stacked over domains (a pytree).

    Attributes:
      mean: (D, *features) running means, row d for domain d; float32 (float64 under x64).
      var: (D, *features) running variances (biased unless the layer stores unbiased ones).
      count: (D,) int32, batches folded into each domain's statistics.
      skipped: (D,) int32, training batches whose statistics for that domain were not finite
        and were left out. A batch without (two valid values of) a domain moves neither.

    Example:
      >>> x = jnp.array([[1.0], [3.0], [10.0], [20.0]])
      >>> domain = jnp.array([0, 0, 1, 1])
      >>> _, state = domain_batch_norm(x, domain_batch_norm_state(2, 1), domain=domain,
      ...                              training=True, momentum=0.0)
      >>> state.mean.tolist(), state.var.tolist(), state.count.tolist()
      ([[2.0], [15.0]], [[1.0], [25.0]], [1, 1])
    """

    mean: Array
    var: Array
    count: Array
    skipped: Array


def domain_batch_norm_state(
    num_domains: int, num_features: int | Sequence[int], dtype=None
) -> DomainBatchNormState:
    """A fresh state: mean 0, variance 1 in every domain, nothing counted.

    Args:
      num_domains: D, the number of domains (>= 1).
      num_features: channels C, or the feature shape for several feature axes.
      dtype: statistics dtype; default float32 (float64 when x64 is enabled).

    Example:
      >>> state = domain_batch_norm_state(2, 64)
      >>> state.mean.shape, state.count.shape
      ((2, 64), (2,))
    """
    num_domains = checks.as_int(num_domains, "num_domains")
    if num_domains < 1:
        raise ValueError(f"`num_domains` must be a positive int, got {num_domains!r}.")
    single = batch_norm_state(num_features, dtype)  # checks num_features and dtype
    stacked = lambda a: jnp.broadcast_to(a, (num_domains, *a.shape))  # noqa: E731
    counter = jnp.zeros((num_domains,), jnp.int32)
    return DomainBatchNormState(stacked(single.mean), stacked(single.var), counter, counter)


def _per_example(table: Array, domain: Array, view: list[int]) -> Array:
    """Each example's row of a (G, D, *features) table (G ghost groups of consecutive
    examples; G = 1 without ghost batches), shaped to broadcast against x (`view`); NaN for a
    domain index outside [0, D) (a traced bad index shows).

    A select and a sum over D of per-example rows (a sum of one value and zeros, exact), not a
    gather: it needs no collective when the batch is sharded over devices.
    """
    groups, num_domains = table.shape[:2]
    rows = jnp.broadcast_to(table[:, None], (groups, domain.shape[0] // groups, *table.shape[1:]))
    rows = rows.reshape((domain.shape[0], *table.shape[1:]))
    member = jnp.arange(num_domains) == domain[:, None]
    member = member.reshape(member.shape + (1,) * (rows.ndim - 2))
    chosen = jnp.sum(jnp.where(member, rows, jnp.zeros((), rows.dtype)), axis=1)
    in_range = (domain >= 0) & (domain < num_domains)
    chosen = jnp.where(in_range.reshape((-1,) + (1,) * (chosen.ndim - 1)), chosen, jnp.nan)
    return chosen.reshape(view)


def _domain_moments_by_group(x, domain, num_domains, feature_axes, mask, group_size):
    """Exact moments per (ghost group, domain): (shift, Moments of x - shift), each of shape
    (G, D, *features); the mean of the values is ``shift + moments.mean``. The shift is one
    value of x per channel (`stats.merge_across_devices` takes it as it is).

    Each example is summarised over its own spatial positions first (two-pass
    `stats.moments`), then the examples of one domain merge exactly (`stats.combine`, Chan);
    the other domains' examples enter with count 0 (selected away, so their NaN cannot leak).
    Two passes over x, as batch norm; the merges run on (N, D, *features) summaries.
    """
    spatial = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    groups = x.shape[0] // group_size
    values = x.astype(stats.stats_dtype(x.dtype)).reshape((groups, group_size, *x.shape[1:]))
    mask = checks.broadcast_mask(mask, x)
    mask = None if mask is None else mask.reshape(values.shape)
    within = tuple(a + 1 for a in spatial)
    # Moments of x minus one of its own values per channel (and ghost group): per-example
    # means are then small numbers, exact even when |mean| >> std (each would otherwise round
    # at the scale of the mean). Per group, so a batch sharded over devices needs no traffic.
    base = lax.stop_gradient(stats._shift(values, (1, *within), mask))
    # A non-finite value of one domain must not become every domain's shift.
    base = jnp.where(jnp.isfinite(base), base, jnp.zeros((), base.dtype))
    per_example = stats.moments(values - base, within, mask)
    kept = (groups, group_size, *(x.shape[a] if a in feature_axes else 1 for a in range(1, x.ndim)))
    member = (jnp.arange(num_domains) == domain[:, None]).reshape(
        (x.shape[0], num_domains) + (1,) * len(feature_shape)
    )
    grouped = (groups, group_size, num_domains, *feature_shape)

    def spread(field):
        field = jnp.broadcast_to(field, kept).reshape((x.shape[0], 1, *feature_shape))
        return jnp.where(member, field, 0).reshape(grouped)

    merged = stats.combine(stats.Moments(*(spread(f) for f in per_example)), axis=1)
    shift = jnp.broadcast_to(base.reshape((groups, 1, *feature_shape)), merged.mean.shape)
    return shift, merged


def domain_moments(x, domain, num_domains: int, *, axis=-1, mask=None) -> stats.Moments:
    """Per-domain moments of x: `Moments` whose fields have shape (D, *features), row d
    summarising the valid values of domain d's examples (count 0 for an absent domain).

    What precise recalibration of a domain batch norm accumulates (`bnjax.lifecycle`).

    Example:
      >>> x = jnp.array([[1.0], [3.0], [10.0]])
      >>> m = domain_moments(x, jnp.array([0, 0, 1]), 3)
      >>> m.count[:, 0].tolist(), m.mean[:, 0].tolist(), m.m2[:, 0].tolist()
      ([2.0, 1.0, 0.0], [2.0, 10.0, 0.0], [2.0, 0.0, 0.0])
    """
    x = jnp.asarray(x)
    feature_axes = checks.normalize_axes(axis, x.ndim, "axis")
    if 0 in feature_axes:
        raise ValueError(f"`axis`={axis!r} includes axis 0, which holds the examples.")
    num_domains = checks.as_int(num_domains, "num_domains")
    domain = check_domain(domain, x.shape[0], num_domains)
    shift, moments = _domain_moments_by_group(
        x, domain, num_domains, feature_axes, mask, max(x.shape[0], 1)
    )
    moments = moments._replace(mean=jnp.where(moments.count > 0, moments.mean + shift, 0))
    return stats.Moments(*(field[0] for field in moments))


def _evaluate(x, state, scale, bias, domain, feature_axes, epsilon) -> Array:
    check_known_statistics(state, ("var",), _FUNCTION, finite=False)
    dtype = stats.stats_dtype(x.dtype)
    view = [x.shape[a] if a == 0 or a in feature_axes else 1 for a in range(x.ndim)]
    inv = lax.rsqrt(state.var.astype(stats.real_dtype(dtype)) + epsilon)
    if scale is not None:
        inv = inv * scale.astype(dtype)
    mean = state.mean.astype(dtype)
    y = (x.astype(dtype) - _per_example(mean[None], domain, view)) * _per_example(
        inv[None], domain, view
    )
    if bias is not None:
        y = y + _per_example(bias.astype(dtype)[None], domain, view)
    return y.astype(x.dtype)


def _as_batch_norm(x, state, scale, bias, domain, **options):
    """One domain: `batch_norm` itself on row 0 (its numbers and its counters' rules, bit for
    bit); a traced index other than 0 still gets a NaN output."""
    row = BatchNormState(state.mean[0], state.var[0], state.count[0], state.skipped[0])
    y, new = batch_norm(
        x,
        row,
        None if scale is None else scale[0],
        None if bias is None else bias[0],
        training=True,
        **options,
    )
    y = jnp.where((domain == 0).reshape((-1,) + (1,) * (x.ndim - 1)), y, jnp.nan)
    return y.astype(x.dtype), DomainBatchNormState(*(jnp.expand_dims(f, 0) for f in new))


def _domain_update(state, batch, momentum, guard) -> DomainBatchNormState:
    """Folds each domain's batch statistics into its row, per domain: a domain the batch
    did not estimate (fewer than two valid values in every feature) keeps its row and its
    counters; one whose new statistics are not finite keeps its row and counts a skip."""
    feature_axes = tuple(range(1, state.mean.ndim))
    count = state.count.reshape((-1,) + (1,) * len(feature_axes))
    new_mean, new_var = updated_statistics(state.mean, state.var, batch, count, momentum)
    finite = jnp.all(jnp.isfinite(new_mean) & jnp.isfinite(new_var), axis=feature_axes)
    present = jnp.any(batch.estimated, axis=feature_axes)
    folded = finite & present & guard.finite
    keep = folded.reshape(count.shape)
    skip = present & ~finite & guard.finite
    return state._replace(
        mean=jnp.where(keep, new_mean, state.mean),
        var=jnp.where(keep, new_var, state.var),
        count=state.count + folded.astype(jnp.int32),
        skipped=state.skipped + skip.astype(jnp.int32) + guard.alert,
    )


def domain_batch_norm(
    x: Array,
    state: DomainBatchNormState,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    domain,
    training: bool,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name=None,
    axis_index_groups=None,
    ghost_batch_size: int | None = None,
    mask: Array | None = None,
    use_unbiased_running_var: bool = False,
) -> tuple[Array, DomainBatchNormState]:
    """Batch normalization with the statistics (and optionally the affine) of each example's
    domain: ``y_n = scale_d * (x_n - mu_d) / sqrt(var_d + epsilon) + bias_d``, d = domain[n].

    Args:
      x: input (N, ..., C) (any feature `axis` but 0, which indexes the examples). Statistics
        in float32 (float64 for float64 x); `y` has x's dtype.
      state: DomainBatchNormState with (D, *features) statistics (`domain_batch_norm_state`).
      scale: None (1), a shared (C,) scale, or one per domain, (D, C).
      bias: None (0), a shared (C,) bias, or one per domain, (D, C).
      domain: int array (N,) of domain indices in [0, D), or one int for the whole batch.
        Known indices are checked; a traced index outside [0, D) enters no statistics and
        gets a NaN output.
      training: True normalizes each domain with its batch statistics and updates its running
        statistics; False uses each example's domain's running statistics, state unchanged.
      momentum: decay of the running averages (None: cumulative average per domain).
      epsilon: added to the variance before the square root.
      axis: feature axis or axes.
      axis_name: inside pmap/shard_map, the axis whose devices share each domain's statistics
        (exact merge with counts: a device without examples of a domain adds nothing to it).
        None keeps statistics per device. For federated local statistics (FedBN, SiloBN) give
        each client its own domain index: syncing then changes no number.
      axis_index_groups: sub-groups of devices that share statistics (pmap only).
      ghost_batch_size: statistics per consecutive group of this many examples and domain, as
        in `batch_norm`; local under `axis_name` (only the running update is averaged).
      mask: booleans broadcastable to x, as `batch_norm`: False values are left out of their
        domain's statistics but still normalized by them.
      use_unbiased_running_var: store ``var * n / (n - 1)`` per domain, like PyTorch.

    Returns:
      (y, new_state). Per domain, in training: a domain with fewer than two valid values in
      every feature keeps its statistics and counters (features with fewer than two keep
      theirs); one whose statistics are not finite keeps them and counts in `skipped[d]`; the
      others are folded in and counted in `count[d]`. Non-finite incoming statistics are
      handled as in `batch_norm` (error when known, unchanged state when traced).

    Example:
      >>> x = jnp.array([[0.0], [2.0], [10.0], [30.0]])
      >>> domain = jnp.array([0, 0, 1, 1])
      >>> y, _ = domain_batch_norm(x, domain_batch_norm_state(2, 1), domain=domain, training=True)
      >>> y[:, 0].round(4).tolist()                   # each pair normalized on its own
      [-1.0, 1.0, -1.0, 1.0]
    """
    given_state = state
    x = jnp.asarray(x)
    checks.check_floating(x, "x")
    training = checks.check_training(training)
    checks.check_epsilon(epsilon)
    checks.check_momentum(momentum)
    checks.check_axis_name(axis_name, axis_index_groups)
    if x.ndim < 2:
        raise ValueError(
            f"`x` must have a batch axis and a feature axis, got shape {tuple(x.shape)}; "
            f"for a single feature vector use x[None]."
        )
    feature_axes = checks.normalize_axes(axis, x.ndim, "axis")
    if 0 in feature_axes:
        raise ValueError(
            f"`axis`={axis!r} includes axis 0, which holds the examples that `domain` indexes; "
            f"pick feature axes among 1..{x.ndim - 1}."
        )
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    state = check_state(state, feature_shape, axis)
    num_domains = state.mean.shape[0]
    domain = check_domain(domain, x.shape[0], num_domains)
    scale = check_param(scale, "scale", feature_shape, num_domains, x.dtype)
    bias = check_param(bias, "bias", feature_shape, num_domains, x.dtype)
    use_unbiased_running_var = checks.check_option_flag(
        use_unbiased_running_var, "use_unbiased_running_var"
    )
    if not training:
        return _evaluate(x, state, scale, bias, domain, feature_axes, epsilon), given_state
    options = dict(
        momentum=momentum,
        epsilon=epsilon,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
        mask=mask,
        use_unbiased_running_var=use_unbiased_running_var,
    )

    if num_domains == 1:
        return _as_batch_norm(x, state, scale, bias, domain, **options)
    layout = batch_layout(x, axis, ghost_batch_size)
    guard = guard_statistics(state, ("mean", "var"), _FUNCTION)
    plan = plan_training(
        x,
        layout,
        function=_FUNCTION,
        axis=axis,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_batch_size=ghost_batch_size,
    )
    group_size = layout.grouped_shape[1]
    shift, batch = _domain_moments_by_group(x, domain, num_domains, feature_axes, mask, group_size)
    if plan.kernel.axis_name is None:
        batch = batch._replace(mean=jnp.where(batch.count > 0, batch.mean + shift, 0))
    else:  # exact over devices; a device without examples of a domain adds count 0
        batch = stats.merge_across_devices(
            batch, plan.kernel.axis_name, plan.kernel.axis_index_groups, shift
        )
    var = batch.m2 / jnp.maximum(batch.count, 1)
    eps = epsilon if plan.epsilon is None else plan.epsilon
    inv = stats.inverse_root(batch.count, var, jnp.asarray(eps, var.dtype))
    update = batch_statistics_for_update(
        lax.stop_gradient(batch.mean),
        lax.stop_gradient(var),
        batch.count,
        layout._replace(feature_shape=(num_domains, *feature_shape)),
        plan,
        use_unbiased_running_var=use_unbiased_running_var,
    )
    new_state = _domain_update(state, update, momentum, guard)
    # Each example reads the row of its ghost group and domain (NaN outside [0, D)).
    dtype = stats.stats_dtype(x.dtype)

    def rows(table):  # (G, D, *features), or a (D, *features) parameter broadcast to it
        return jnp.broadcast_to(table.astype(dtype), batch.count.shape)

    view = [x.shape[a] if a == 0 or a in feature_axes else 1 for a in range(x.ndim)]
    gain = inv if scale is None else inv * scale.astype(dtype)
    # (x - mu) first: x and mu are close when |mu| >> std, so the difference is exact.
    y = (x.astype(dtype) - _per_example(rows(batch.mean), domain, view)) * _per_example(
        rows(gain), domain, view
    )
    if bias is not None:
        y = y + _per_example(rows(bias), domain, view)
    return y.astype(x.dtype), new_state
