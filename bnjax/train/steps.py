"""The model, its training state, and the per-device train and evaluation steps.

The state is a plain dict pytree, so it checkpoints as is:

    {"step": int32 scalar, "params": ..., "batch_stats": ..., "opt_state": ...}

('batch_stats' is absent for norms without running statistics.) One
`train_step(state, batch, axis_name)` serves every parallel mode of `bnjax.parallel`: under
`jit` (`axis_name=None`) batch norm's statistics are global by construction; under `shard_map`
or `pmap` the model's norms sync over `axis_name` and the gradient is averaged over devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax import diagnostics, models, parallel

STATE_COLLECTIONS = ("batch_stats",)


def make_model(
    name: str,
    *,
    num_classes: int,
    norm: str = "batch",
    norm_groups: int = 8,
    bn_momentum: float = 0.99,
    ghost_batch_size: int | None = None,
    axis_name=None,
    norm_options: Mapping[str, Any] | None = None,
    features: Sequence[int] | None = None,
    zero_init_residual: bool = False,
    mixed_precision: bool = False,
    for_training: bool = True,
):
    """The model `name` of `bnjax.models.MODELS` with the norm `norm` of `bnjax.models.NORMS`.

    Batch-statistics norms get `bn_momentum`, `axis_name` (sync over devices),
    `ghost_batch_size` and `norm_options` (any other module option); per-example norms take
    none of them. `features` are the widths of the models that take them (ignored by the
    others), `mixed_precision` computes in bfloat16 (parameters stay float32).

    This is the one place that decides what the evaluation network leaves out:
    `for_training=False` drops `ghost_batch_size` and `axis_name`. Ghost groups shape training
    statistics only; evaluation batches (of any size, under plain jit) are normalized with the
    whole batch's statistics, also in the batch-statistics evaluation, which runs the norms in
    training mode (so the modules' own rule, no ghost groups with running statistics, is not
    enough there).
    """
    options = {}
    # Running-statistics options exist only on batch-statistics norms; group, layer and
    # instance norm are per example and take none of them.
    if norm in models.BATCH_STATISTICS_NORMS:
        options["momentum"] = bn_momentum
        if for_training and axis_name is not None:
            options["axis_name"] = axis_name
        if for_training and ghost_batch_size is not None:
            options["ghost_batch_size"] = ghost_batch_size
        options.update(norm_options or {})
    # An unknown name reaches build_model, whose error lists the models.
    takes_widths = models.MODELS.get(name, (None, False))[1]
    return models.build_model(
        name,
        num_classes=num_classes,
        norm=norm,
        norm_groups=norm_groups,
        norm_options=options,
        dtype=jnp.bfloat16 if mixed_precision else jnp.float32,
        features=tuple(features) if takes_widths and features is not None else None,
        zero_init_residual=zero_init_residual,
    )


def initial_state(model, optimizer, sample_images, seed: int) -> dict:
    """Variables from `seed` (parameters float32 even under mixed precision) + optimizer."""
    variables = model.init(jax.random.key(seed), sample_images, train=False)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"]}
    for collection in STATE_COLLECTIONS:
        if collection in variables:
            state[collection] = variables[collection]
    state["opt_state"] = optimizer.init(variables["params"])
    return state


def _variables(state, params=None) -> dict:
    variables = {"params": state["params"] if params is None else params}
    variables.update({c: state[c] for c in STATE_COLLECTIONS if c in state})
    return variables


class StepInternals(NamedTuple):
    """What one train step computed, handed to `make_train_step`'s `extras` (per device).

    logits (N, K), labels (N,); intermediates: the 'intermediates' collection the step's
    `capture_intermediates` filter recorded ({} without one); grads: the loss gradient (as
    `params`, averaged over devices); changes: the optimizer's update added to `params`.
    """

    logits: jax.Array
    labels: jax.Array
    intermediates: Any
    grads: Any
    changes: Any


def make_train_step(
    model,
    optimizer,
    *,
    telemetry: bool = False,
    capture_intermediates: Callable[[Any, str], bool] | None = None,
    extras: Callable[[StepInternals], dict] | None = None,
):
    """`train_step(state, batch, axis_name) -> (state, metrics)` for `bnjax.parallel`.

    `batch` is {'image': (N, ...), 'label': (N,)}. Metrics: 'loss' (global mean cross-entropy),
    'accuracy', with `telemetry` each BN layer's drift and skipped-update count from
    `bnjax.diagnostics` (jit mode only: under shard_map/pmap they would differ per device),
    and whatever `extras(StepInternals)` returns (a dict of arrays), which sees the
    intermediates `capture_intermediates` (a flax `capture_intermediates` filter) recorded.
    """
    mutable = list(STATE_COLLECTIONS)
    if capture_intermediates is not None:
        mutable.append("intermediates")

    def loss_fn(params, state, batch, axis_name):
        record = telemetry and axis_name is None
        names = mutable + (["bn_telemetry"] if record else [])
        apply = lambda: model.apply(  # noqa: E731
            _variables(state, params),
            batch["image"],
            train=True,
            mutable=names,
            capture_intermediates=capture_intermediates or False,
        )
        if record:
            with diagnostics.telemetry():
                logits, updates = apply()
        else:
            logits, updates = apply()
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, updates)

    def train_step(state, batch, axis_name):
        grad_fn = parallel.data_parallel_value_and_grad(loss_fn, axis_name, has_aux=True)
        (loss, (logits, updates)), grads = grad_fn(state["params"], state, batch, axis_name)
        changes, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = dict(state)
        new_state.update(
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], changes),
            opt_state=opt_state,
        )
        new_state.update({c: updates[c] for c in STATE_COLLECTIONS if c in state})
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            accuracy = lax.pmean(accuracy, axis_name)
        metrics = {"loss": loss, "accuracy": accuracy}
        if "bn_telemetry" in updates:
            # Drift and skipped updates per layer; the other summaries stay a call away
            # (bnjax.diagnostics) rather than swelling every log line.
            summaries = diagnostics.summaries(updates["bn_telemetry"])
            metrics.update(
                {k: v for k, v in summaries.items() if k.endswith(("/drift", "/skipped"))}
            )
        if extras is not None:
            internals = StepInternals(
                logits, batch["label"], updates.get("intermediates", {}), grads, changes
            )
            metrics.update(extras(internals))
        return new_state, metrics

    return train_step


def make_eval_step(model):
    """`eval_step(state, images, labels, valid=None) -> (correct with running stats, with batch
    stats)`, counted over the examples where `valid` (N,) is True (all when None).

    Evaluation mode normalizes with the running statistics (what serving sees); the second
    count normalizes each evaluation batch with its own statistics (training mode, state
    discarded), so the gap between the two is the cost of the running averages. Rows where
    `valid` is False (padding) are left out of those batch statistics and of both counts.
    """

    @jax.jit
    def eval_step(state, images, labels, valid=None):
        variables = _variables(state)
        running = model.apply(variables, images, train=False)
        batch, _ = model.apply(
            variables, images, train=True, mask=valid, mutable=list(STATE_COLLECTIONS)
        )
        keep = jnp.ones(labels.shape, bool) if valid is None else valid

        def count(logits):
            return jnp.sum((jnp.argmax(logits, -1) == labels) & keep)

        return count(running), count(batch)

    return eval_step
