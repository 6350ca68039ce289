"""flax.linen MovingAverageBatchNorm and its backward-statistics probes: `backward_probes`,
`apply_backward_statistics`, `PROBE_COLLECTION`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from bnjax.core.moving_average_batch_norm import (
    MovingAverageBatchNormState,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
)
from bnjax.linen._shared import (
    _AffineMixin,
    _feature_shape,
)
from bnjax.module_common import check_use_running_average, promote

PROBE_COLLECTION = "backward_probe"
"""The linen collection of `MovingAverageBatchNorm`'s zero 'probe' inputs, whose gradient is
each layer's backward batch statistics (see `backward_probes`)."""

_MOVING_AVERAGE_HISTORIES = (
    "mean_history",
    "var_history",
    "grad_mean_history",
    "grad_scaled_history",
)
_MOVING_AVERAGE_COUNTERS = ("count", "backward_count", "skipped")


class MovingAverageBatchNorm(_AffineMixin, nn.Module):
    """Moving average batch normalization (`bnjax.moving_average_batch_norm`, MABN).

    Training normalizes with simple moving averages of the batch statistics over the last
    `window` steps, in the forward (the second moment; mean and variance with `centered`) and
    in the backward (psi, and g with `centered`), renormalized towards the exponential
    averages 'mean' and 'var' that evaluation uses, as batch norm does (so the lifecycle tools
    fold it like one). Pair it with zero-mean weights in the layer before.

    Variables: 'params' 'scale', 'bias' (C,); 'batch_stats' 'mean', 'var' (C,), the four
    histories (window - 1, C), int32 'count', 'backward_count', 'skipped'; and, from
    ``init``, ``'backward_probe'`` 'probe' (2, C) zeros. Train with
    ``mutable=['batch_stats']`` and differentiate the loss with respect to the
    'backward_probe' variables too; then ``apply_backward_statistics(batch_stats, probe_grads)``
    stores this step's backward statistics (`bnjax.train`'s train step does both). Without
    the probe the layer still trains with MABN's gradient, averaging only the current step's
    backward statistics.

    Attributes:
      use_running_average, axis, momentum (default 0.98), epsilon, dtype, param_dtype,
      use_bias, use_scale, bias_init, scale_init, axis_name, axis_index_groups: as in
        BatchNorm.
      window: steps m of the simple moving averages (1: the current batch only).
      centered: keep the mean statistics (otherwise the second moment only, the paper's
        reduced form).
      r_max, d_max, renorm_warmup_steps: renormalization bounds and warm-up (see the core).

    Example:
      >>> layer = MovingAverageBatchNorm(use_running_average=False, window=4)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> sorted(variables), variables["batch_stats"]["var_history"].shape
      (['backward_probe', 'batch_stats', 'params'], (3, 3))
      >>> def loss(params, probes):
      ...     y, updates = layer.apply({**variables, "params": params, "backward_probe": probes},
      ...                              x, mutable=["batch_stats"])
      ...     return jnp.sum(y * x), updates["batch_stats"]
      >>> (grads, probe_grads), stats = jax.grad(loss, (0, 1), has_aux=True)(
      ...     variables["params"], variables["backward_probe"])
      >>> stats = apply_backward_statistics(stats, probe_grads)
      >>> int(stats["count"]), int(stats["backward_count"])
      (1, 1)
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.98
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    window: int = 16
    centered: bool = False
    r_max: float = 5.0
    d_max: float = 5.0
    renorm_warmup_steps: int = 1000

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        training = not nn.merge_param(
            "use_running_average",
            check_use_running_average(self.use_running_average),
            check_use_running_average(use_running_average),
        )
        x = jnp.asarray(x)
        feature_shape = _feature_shape(x, self.axis, "axis")
        fresh = moving_average_batch_norm_state(feature_shape, window=self.window)
        fields = {
            name: self.variable("batch_stats", name, lambda v=value: v)
            for name, value in fresh._asdict().items()
        }
        state = MovingAverageBatchNormState(**{n: v.value for n, v in fields.items()})
        probe = None
        if self.is_initializing() or self.has_variable(PROBE_COLLECTION, "probe"):
            probe = self.variable(
                PROBE_COLLECTION, "probe", moving_average_batch_norm_probe, fresh
            ).value
        scale, bias = self._scale_and_bias(feature_shape)
        x, out_dtype = promote(x, scale, bias, self.dtype)
        initializing = self.is_initializing()
        y, new_state = moving_average_batch_norm(
            x,
            state,
            scale,
            bias,
            probe,
            training=training and not initializing,
            momentum=self.momentum,
            epsilon=self.epsilon,
            centered=self.centered,
            r_max=self.r_max,
            d_max=self.d_max,
            renorm_warmup_steps=self.renorm_warmup_steps,
            axis=self.axis,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
        if training and not initializing:
            for name, variable in fields.items():
                variable.value = getattr(new_state, name)
        return y.astype(out_dtype)


def _is_moving_average_stats(node) -> bool:
    return isinstance(node, Mapping) and all(
        name in node for name in (*_MOVING_AVERAGE_HISTORIES, "var", "backward_count")
    )


def backward_probes(batch_stats) -> dict:
    """Zero probes for every `MovingAverageBatchNorm` in a 'batch_stats' tree, nested as
    the layers are ({} when there is none): the ``'backward_probe'`` collection to apply the
    model with, and to differentiate with respect to.

    Example:
      >>> backward_probes({"conv": {}, "norm": {"mean": jnp.zeros(2), "var": jnp.ones(2)}})
      {}
    """

    def walk(node):
        if _is_moving_average_stats(node):
            return {"probe": jnp.zeros((2, *jnp.shape(node["var"])), jnp.result_type(node["var"]))}
        found = {}
        if isinstance(node, Mapping):
            for key, value in node.items():
                probes = walk(value)
                if probes:
                    found[key] = probes
        return found

    return walk(batch_stats)


def apply_backward_statistics(batch_stats, probe_grads) -> dict:
    """'batch_stats' with each moving-average layer's backward statistics (its probe's
    gradient, from `backward_probes`' tree) folded in
    (`bnjax.moving_average_batch_norm_backward_update`); other layers unchanged.

    Example:
      >>> layer = MovingAverageBatchNorm(use_running_average=False, window=2)
      >>> stats = layer.init(jax.random.key(0), jnp.ones((4, 3)))["batch_stats"]
      >>> grads = jax.tree.map(jnp.ones_like, backward_probes(stats))
      >>> apply_backward_statistics(stats, grads)["grad_scaled_history"].tolist()
      [[1.0, 1.0, 1.0]]
    """

    def walk(node, grads):
        if _is_moving_average_stats(node):
            state = MovingAverageBatchNormState(
                **{name: node[name] for name in MovingAverageBatchNormState._fields}
            )
            updated = moving_average_batch_norm_backward_update(state, grads["probe"])
            return {**node, **updated._asdict()}
        if isinstance(node, Mapping):
            return {
                key: walk(value, grads[key]) if key in grads else value
                for key, value in node.items()
            }
        return node

    return walk(batch_stats, probe_grads)
