"""The batch-composition study's metrics: plain NumPy on what a training loop records.

One function per column of the paper's Table 1; this module has those measured on the training
run, `bnjax.study.evaluation` those measured on held-out data and the mean +- std summary.
Every function takes NumPy (or JAX) arrays, computes in float64 and returns Python floats (or a
dict of them); none of them trains, samples or touches a model. Bad input raises ValueError
naming the argument. Non-finite values (a run that diverged) are not an error: they propagate
as the formulas say.

    column                       function                   larger value means
    BN statistical stability     batch_stat_variability     less stable batch statistics
    convergence                  final_loss                 worse end point
                                 loss_oscillation           more oscillatory curve
                                 steps_to_target            slower (None: never reached)
    gradient noise               update_noise               noisier update directions
    running-statistics bias      running_stat_bias          running stats further from truth
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "batch_stat_variability",
    "final_loss",
    "loss_oscillation",
    "population_stats",
    "running_stat_bias",
    "smooth",
    "steps_to_target",
    "trajectory_variance",
    "update_noise",
    "update_pair",
]


# ---------------------------------------------------------------- input validation


def _array(x, name: str, ndim: int | tuple[int, ...], *, min_len: int = 1) -> np.ndarray:
    """`x` as a float64 array of `ndim` dimensions with at least `min_len` rows."""
    a = np.asarray(x, dtype=np.float64)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {a.shape}")
    if a.size == 0 or a.shape[0] < min_len:
        raise ValueError(f"{name}: needs at least {min_len} entries along axis 0, got {a.shape}")
    return a


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}")


# ---------------------------------------------------------------- BN statistical stability


def trajectory_variance(trajectory, scale=None, *, method: str = "variance") -> float:
    """Variability across iterations of a (T, C) trajectory s of per-step statistics, C channels.

    method="variance":   V = mean_c Var_t(s[t, c] / scale[c])                (ddof 0)
    method="successive": V = mean_c mean_t (s[t+1, c] - s[t, c])^2 / (2 scale[c]^2)

    `scale` is a (C,) positive divisor (default 1). "successive" (von Neumann) equals the
    variance for independent fluctuations around a fixed value but ignores a slow trend, so it
    separates batch-to-batch noise from the drift that learning itself causes. 0 for a constant
    trajectory; larger = the statistic changes more from step to step.

    Example:
      >>> trajectory_variance(np.full((5, 3), 2.0))  # constant: no variability
      0.0
      >>> trajectory_variance([[0.0], [2.0]])  # Var{0, 2} = 1
      1.0
      >>> trajectory_variance([[0.0], [2.0]], method="successive")  # (2 - 0)^2 / 2
      2.0
      >>> trajectory_variance([[0.0], [2.0]], scale=[2.0])  # Var{0, 1}
      0.25
    """
    s = _array(trajectory, "trajectory", 2, min_len=2 if method == "successive" else 1)
    if scale is not None:
        d = _array(scale, "scale", 1)
        if d.shape != s.shape[1:]:
            raise ValueError(f"scale: expected shape {s.shape[1:]} (channels), got {d.shape}")
        s = s / d
    if method == "variance":  # shifted by the first row: exact 0 for a constant trajectory
        return float(np.mean(np.var(s - s[0], axis=0)))
    if method == "successive":
        return float(np.mean(np.diff(s, axis=0) ** 2) / 2)
    raise ValueError(f"method: expected 'variance' or 'successive', got {method!r}")


def batch_stat_variability(
    batch_means,
    batch_vars=None,
    *,
    population_var=None,
    method: str = "variance",
    epsilon: float = 1e-5,
) -> dict[str, float]:
    """BN statistical stability of one layer from its per-step batch statistics.

    Args:
      batch_means: (T, C) per-step batch mean mu_B[t, c] of the layer's input.
      batch_vars: optional (T, C) per-step batch variance var_B[t, c].
      population_var: optional (C,) variance var_pop of the layer's input over the whole data
        set; makes both numbers dimensionless, so layers and conditions are comparable.
      method: "variance" or "successive", see `trajectory_variance`.

    Returns, with p_c = var_pop[c] + epsilon (or 1 without population_var):
      mean_variability = mean_c Var_t(mu_B[t, c]) / p_c
      var_variability  = mean_c Var_t(var_B[t, c] / p_c)      (only with batch_vars)
    Normalized, mean_variability is about 1/B for independent batches of B i.i.d. examples
    (1/(B*H*W) for independent positions). 0 = perfectly stable; larger = less stable.

    Example:
      >>> batch_stat_variability([[0.0], [2.0]], [[1.0], [3.0]], population_var=[4.0],
      ...                        epsilon=0.0)  # Var{0, 2} / 4 and Var{1/4, 3/4}
      {'mean_variability': 0.25, 'var_variability': 0.0625}

      Independent batches of B = 16 standard normal examples: about 1/B = 0.0625.

      >>> x = np.random.default_rng(0).normal(size=(1000, 16, 4))  # (T, B, C)
      >>> v = batch_stat_variability(x.mean(axis=1), population_var=np.ones(4))
      >>> round(v["mean_variability"], 3)
      0.064
    """
    mu = _array(batch_means, "batch_means", 2)
    scale = None
    if population_var is not None:
        p = _array(population_var, "population_var", 1)
        if p.shape != mu.shape[1:]:
            raise ValueError(f"population_var: expected shape {mu.shape[1:]}, got {p.shape}")
        scale = p + epsilon
    out = {
        "mean_variability": trajectory_variance(
            mu, None if scale is None else np.sqrt(scale), method=method
        )
    }
    if batch_vars is not None:
        v = _array(batch_vars, "batch_vars", 2)
        _same_shape(batch_means=mu, batch_vars=v)
        out["var_variability"] = trajectory_variance(v, scale, method=method)
    return out


# ---------------------------------------------------------------- convergence


def smooth(losses, window: int = 1) -> np.ndarray:
    """Trailing moving average: out[j] = mean(losses[j : j + window]), length T - window + 1.

    out[j] is the smoothed loss at step index j + window - 1. window=1 returns the curve.

    Example:
      >>> smooth([1.0, 2.0, 3.0, 4.0], window=2)
      array([1.5, 2.5, 3.5])
    """
    x = _array(losses, "losses", 1)
    if not isinstance(window, int) or not 1 <= window <= len(x):
        raise ValueError(f"window: expected an int in [1, {len(x)}] (len(losses)), got {window}")
    return np.lib.stride_tricks.sliding_window_view(x, window).mean(axis=-1)


def final_loss(losses, k: int = 10) -> float:
    """Mean of the last min(k, T) losses of a (T,) loss curve. Larger = worse end point.

    Example:
      >>> final_loss([5.0, 4.0, 3.0, 1.0], k=2)  # (3 + 1) / 2
      2.0
    """
    x = _array(losses, "losses", 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k}")
    return float(np.mean(x[-k:]))


def loss_oscillation(
    losses, *, window: int = 1, per_step: bool = False, excess: bool = False
) -> float:
    """Total variation of the (smoothed) loss curve: TV = sum_t |L[t+1] - L[t]|.

    L = smooth(losses, window). excess=True subtracts |L[-1] - L[0]|, the TV of a monotone
    curve between the same end points, leaving only the up-and-down movement (0 for a
    monotone curve). per_step=True divides by the number of differences, len(L) - 1.
    0 = flat (or monotone, with excess); larger = more oscillation. Needs >= 2 smoothed points.

    Example:
      >>> losses = [3.0, 1.0, 2.0, 0.0]
      >>> loss_oscillation(losses)  # 2 + 1 + 2
      5.0
      >>> loss_oscillation(losses, excess=True)  # 5 - |0 - 3|
      2.0
      >>> loss_oscillation(losses, excess=True, per_step=True)  # 2 / 3 differences
      0.6666666666666666
      >>> loss_oscillation([3.0, 2.0, 2.0, 1.0], excess=True)  # monotone
      0.0
    """
    L = smooth(losses, window)
    if len(L) < 2:
        raise ValueError(f"losses: needs at least window + 1 = {window + 1} entries, got {len(L)}")
    d = np.diff(L)
    tv = float(np.sum(np.abs(d)))
    if excess:
        tv -= float(abs(L[-1] - L[0]))
    return tv / len(d) if per_step else tv


def steps_to_target(losses, target: float, *, window: int = 1, steps=None) -> float | None:
    """First step at which the smoothed loss is <= target; None if it never is.

    With L = smooth(losses, window), j* = min{j : L[j] <= target}; the step is the index of
    the last loss in that window, i = j* + window - 1, or steps[i] when `steps` (a (T,) array of
    the step numbers the losses were logged at) is given. Smaller = faster; NaN never counts.

    Example:
      >>> losses = [4.0, 3.0, 1.0, 2.0, 0.5]
      >>> steps_to_target(losses, 1.5)
      2.0
      >>> steps_to_target(losses, 1.5, window=2)  # L = [3.5, 2, 1.5, 1.25]: j* = 2, i = 3
      3.0
      >>> steps_to_target(losses, 1.5, steps=[0, 10, 20, 30, 40])
      20.0
      >>> steps_to_target(losses, 0.1) is None
      True
    """
    L = smooth(losses, window)
    step_numbers = np.arange(len(L) + window - 1, dtype=np.float64)
    if steps is not None:
        step_numbers = _array(steps, "steps", 1)
        if step_numbers.shape != np.shape(losses):
            raise ValueError(f"shape mismatch: losses {np.shape(losses)}, steps {np.shape(steps)}")
    hit = np.flatnonzero(L <= target)
    if hit.size == 0:
        return None
    return float(step_numbers[int(hit[0]) + window - 1])


# ---------------------------------------------------------------- gradient noise


def _flat(update, name: str) -> np.ndarray:
    """One update (array or pytree of arrays) as a flat float64 vector."""
    import jax  # only for pytree flattening

    leaves = [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(update)]
    if not leaves or sum(leaf.size for leaf in leaves) == 0:
        raise ValueError(f"{name}: empty update")
    return np.concatenate(leaves)


def update_pair(previous, current) -> tuple[float, float]:
    """(1 - cosine, relative change) of consecutive updates u, v (arrays or pytrees, flattened).

    1 - cos(u, v) = |u/|u| - v/|v||^2 / 2  (in [0, 2]; exact 0 for identical directions),
    relative change = |v - u| / (|u| + |v|)  (in [0, 1]).
    NaN for both when either update is all zeros (direction undefined).
    Use it online to avoid storing (T, P) updates, and average each over the steps.

    Example:
      >>> update_pair([1.0, 0.0], [0.0, 1.0])  # orthogonal, equal norms: 1 and 1/sqrt(2)
      (1.0, 0.7071067811865476)
      >>> update_pair({"w": np.array([1.0, 2.0])}, {"w": np.array([2.0, 4.0])})  # same direction
      (0.0, 0.3333333333333333)
      >>> update_pair([0.0, 0.0], [1.0, 0.0])
      (nan, nan)
    """
    u, v = _flat(previous, "previous"), _flat(current, "current")
    _same_shape(previous=u, current=v)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return math.nan, math.nan
    one_minus_cos = np.sum((u / nu - v / nv) ** 2) / 2
    return float(one_minus_cos), float(np.linalg.norm(v - u) / (nu + nv))


def update_noise(updates: np.ndarray | Sequence) -> dict[str, float]:
    """Variability of consecutive weight updates (or gradients), T >= 2 of them.

    `updates` is a (T, P) array of flattened updates u_t or a sequence of T pytrees.
    Over the pairs (u_t, u_{t+1}) where neither is all zeros (NaN if there are none):
      cosine_noise    = mean_t (1 - cos(u_t, u_{t+1}))                in [0, 2]
      relative_change = mean_t |u_{t+1} - u_t| / (|u_t| + |u_{t+1}|)  in [0, 1]
    0 / 0 for identical consecutive updates, 1 / (1/sqrt(2) ~ 0.707) for orthogonal ones of
    equal norm, 2 / 1 for opposite ones (any norms). Larger = noisier. With momentum, updates
    are smoothed gradients: pass the gradients to measure the noise the batches inject.

    Example:
      >>> update_noise(np.eye(3))  # each update orthogonal to the previous one
      {'cosine_noise': 1.0, 'relative_change': 0.7071067811865476}
      >>> noise = update_noise([{"w": np.ones(2)}, {"w": np.ones(2)}, {"w": -np.ones(2)}])
      >>> {k: round(v, 6) for k, v in noise.items()}  # pairs: identical (0, 0), opposite (2, 1)
      {'cosine_noise': 1.0, 'relative_change': 0.5}
    """
    if isinstance(updates, np.ndarray) or hasattr(updates, "shape"):
        rows = list(_array(updates, "updates", 2, min_len=2))
    else:
        rows = list(updates)
        if len(rows) < 2:
            raise ValueError(f"updates: needs at least 2 updates, got {len(rows)}")
    pairs = np.array([update_pair(a, b) for a, b in itertools.pairwise(rows)])
    ok = np.isfinite(pairs).all(axis=1)
    if not ok.any():
        return {"cosine_noise": math.nan, "relative_change": math.nan}
    return {
        "cosine_noise": float(np.mean(pairs[ok, 0])),
        "relative_change": float(np.mean(pairs[ok, 1])),
    }


# ---------------------------------------------------------------- running-statistics bias


def population_stats(x, *, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """True per-channel mean and biased variance (ddof 0) of a layer's inputs, in float64.

    `x` is one array (channels on `axis`; every other axis is reduced, as batch norm does) or
    an iterable of such arrays (chunks of the data set, combined exactly: Chan et al.).
    A (nested) list counts as an iterable of chunks, not as one array: pass np.asarray(x).

    Example:
      >>> population_stats(np.array([[1.0, 10.0], [3.0, 30.0]]))  # (N, C)
      (array([ 2., 20.]), array([  1., 100.]))
      >>> x = np.arange(24.0).reshape(6, 2, 2)  # channels on axis 1
      >>> mean, var = population_stats([x[:1], x[1:4], x[4:]], axis=1)  # three chunks
      >>> np.allclose(mean, x.mean(axis=(0, 2))), np.allclose(var, x.var(axis=(0, 2)))
      (True, True)
    """
    chunks = [x] if hasattr(x, "shape") else x
    n, mean, m2 = 0, None, None
    for i, chunk in enumerate(chunks):
        a = np.moveaxis(np.asarray(chunk, np.float64), axis, -1)
        a = a.reshape(-1, a.shape[-1])
        if a.shape[0] == 0:
            continue
        if mean is not None and a.shape[1] != mean.shape[0]:
            raise ValueError(f"x: chunk {i} has {a.shape[1]} channels, expected {mean.shape[0]}")
        k, mu = a.shape[0], a.mean(axis=0)
        q = ((a - mu) ** 2).sum(axis=0)
        if mean is None:
            n, mean, m2 = k, mu, q
        else:
            delta = mu - mean
            mean = mean + delta * k / (n + k)
            m2 = m2 + q + delta**2 * n * k / (n + k)
            n += k
    if mean is None:
        raise ValueError("x: empty")
    return mean, m2 / n


def running_stat_bias(
    running_mean, running_var, population_mean, population_var, *, epsilon: float = 1e-5
) -> dict[str, float]:
    """Distance of a layer's running statistics from the true population ones, all (C,).

      mean_bias  = mean_c |mu_run[c] - mu_pop[c]| / sqrt(var_pop[c] + eps)
      scale_bias = mean_c |log((var_run[c] + eps) / (var_pop[c] + eps))| / 2
      bias       = mean_bias + scale_bias
    (the `bnjax.diagnostics` drift formula with the population in place of the batch, except
    that mean_bias is in population standard deviations, not running ones);
    scale_bias = |log(sigma_run / sigma_pop)|.
    0 = running statistics equal the population's; larger = evaluation normalizes worse.
    An unbiased (n-1) running variance adds about 1 / (2 (n - 1)) to scale_bias.

    Example:
      >>> running_stat_bias([2.0], [4.0], [0.0], [4.0], epsilon=0.0)  # mean off by 1 pop. std
      {'mean_bias': 1.0, 'scale_bias': 0.0, 'bias': 1.0}
      >>> running_stat_bias([0.0], [np.e**2], [0.0], [1.0], epsilon=0.0)  # sigma_run = e sigma_pop
      {'mean_bias': 0.0, 'scale_bias': 1.0, 'bias': 1.0}
    """
    arrays = {
        "running_mean": _array(running_mean, "running_mean", 1),
        "running_var": _array(running_var, "running_var", 1),
        "population_mean": _array(population_mean, "population_mean", 1),
        "population_var": _array(population_var, "population_var", 1),
    }
    _same_shape(**arrays)
    mu_r, var_r, mu_p, var_p = arrays.values()
    mean_bias = float(np.mean(np.abs(mu_r - mu_p) / np.sqrt(var_p + epsilon)))
    scale_bias = float(np.mean(np.abs(np.log((var_r + epsilon) / (var_p + epsilon)))) / 2)
    return {"mean_bias": mean_bias, "scale_bias": scale_bias, "bias": mean_bias + scale_bias}
