"""flax.nnx MovingAverageBatchNorm and its `BackwardProbe` variable."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flax import nnx

from bnjax.core.moving_average_batch_norm import (
    MovingAverageBatchNormState,
    moving_average_batch_norm,
    moving_average_batch_norm_backward_update,
    moving_average_batch_norm_probe,
    moving_average_batch_norm_state,
)
from bnjax.module_common import check_use_running_average
from bnjax.nnx._shared import (
    _shape,
    _WithBias,
)


class BackwardProbe(nnx.Variable):
    """A zero input whose gradient is a `MovingAverageBatchNorm`'s backward batch statistics
    (g_B, psi_B), shape (2, *feature_shape).

    Example:
      >>> layer = MovingAverageBatchNorm(4, rngs=nnx.Rngs(0))
      >>> type(layer.probe).__name__, layer.probe[...].shape
      ('BackwardProbe', (2, 4))
    """


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class MovingAverageBatchNorm(_WithBias):
    """Moving average batch normalization (`bnjax.moving_average_batch_norm`, MABN).

    The state is ``nnx.BatchStat`` 'mean', 'var' (C,), the four histories (window - 1, C) and
    int32 'count', 'backward_count', 'skipped' (see `bnjax.MovingAverageBatchNormState`);
    ``probe`` is a `BackwardProbe` of zeros (2, C). Differentiate the loss with respect to the
    probes too (e.g. ``nnx.grad(loss, argnums=nnx.DiffState(0, (nnx.Param, BackwardProbe)))``)
    and pass each layer's probe gradient to `update_backward_statistics` after the step.

    Example:
      >>> layer = MovingAverageBatchNorm(3, window=2, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> grads = nnx.grad(lambda m: jnp.sum(m(x) * x),
      ...                  argnums=nnx.DiffState(0, BackwardProbe))(layer)
      >>> layer.update_backward_statistics(grads["probe"][...])
      >>> int(layer.count[...]), int(layer.backward_count[...])
      (1, 1)
    """

    use_running_average: bool | None = False
    """True evaluates with the running statistics; ``model.train()`` / ``model.eval()`` and
    the call argument switch it, as in flax."""
    axis: int | Sequence[int] = -1
    """The feature axis or axes (NHWC: -1, NCHW: 1)."""
    momentum: float = 0.98
    """Decay of the exponential averages 'mean' and 'var'."""
    epsilon: float = 1e-5
    """Added to the variance (second moment) before the square root."""
    window: int = 16
    """Steps m of the simple moving averages (1: the current batch only)."""
    centered: bool = False
    """Keep the mean statistics (else the second moment only, the paper's reduced form)."""
    r_max: float = 5.0
    """Bound of the renormalization factor r (1: none)."""
    d_max: float = 5.0
    """Bound of the renormalization shift d (centered only; 0: none)."""
    renorm_warmup_steps: int = 1000
    """Training steps before renormalization starts."""

    def __post_init__(self, *init_only):
        fresh = moving_average_batch_norm_state(_shape(self.num_features), window=self.window)
        for name, value in fresh._asdict().items():
            setattr(self, name, nnx.BatchStat(value))
        self.probe = BackwardProbe(moving_average_batch_norm_probe(fresh))
        super().__post_init__(*init_only)

    def statistics(self) -> dict:
        """{name: nnx.BatchStat} of the state, in `MovingAverageBatchNormState`'s order."""
        return {name: getattr(self, name) for name in MovingAverageBatchNormState._fields}

    def _state(self) -> MovingAverageBatchNormState:
        return MovingAverageBatchNormState(**{n: v[...] for n, v in self.statistics().items()})

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalizes `x` (see BatchNorm.__call__)."""
        use_running_average = check_use_running_average(use_running_average)
        if use_running_average is None:
            use_running_average = check_use_running_average(self.use_running_average)
        training = not use_running_average
        x, scale, bias, out_dtype = self._inputs(x)
        y, new = moving_average_batch_norm(
            x,
            self._state(),
            scale,
            bias,
            self.probe[...],
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            centered=self.centered,
            r_max=self.r_max,
            d_max=self.d_max,
            renorm_warmup_steps=self.renorm_warmup_steps,
            axis=self.axis,
            mask=mask,
            **self._device_options(),
        )
        if training:
            for name, variable in self.statistics().items():
                variable[...] = getattr(new, name)
        return y.astype(out_dtype)

    def update_backward_statistics(self, probe_grad) -> None:
        """Folds this step's backward statistics (the gradient of `probe`) into the state."""
        new = moving_average_batch_norm_backward_update(self._state(), probe_grad)
        for name, variable in self.statistics().items():
            variable[...] = getattr(new, name)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: True evaluates with the running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
