"""The model, its training state, and the per-device train and evaluation steps.

The state is a plain dict pytree, so it checkpoints as is:

    {"step": int32 scalar, "params": ..., "batch_stats": ..., "bn_counters": ...,
     "opt_state": ...}

('batch_stats' / 'bn_counters' are absent for norms without running statistics.) One
`train_step(state, batch, axis_name)` serves every parallel mode of `bnjax.parallel`: under
`jit` (`axis_name=None`) batch norm's statistics are global by construction; under `shard_map`
or `pmap` the model's norms sync over `axis_name` and the gradient is averaged over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax import diagnostics, models, parallel

STATE_COLLECTIONS = ("batch_stats", "bn_counters")


def make_model(config, num_classes: int, axis_name=None, *, for_training: bool = True):
    """The config's model; `axis_name` makes batch-statistics norms sync over devices.

    `for_training=False` leaves out `ghost_batch_size`: ghost groups shape training statistics
    only, and evaluation batches (of any size) use the whole batch's statistics.
    """
    options = {}
    # Running-statistics options exist only on batch-statistics norms; group, layer and
    # instance norm are per example and take none of them.
    if config.norm in models.BATCH_STATISTICS_NORMS:
        options["momentum"] = config.bn_momentum
        if axis_name is not None:
            options["axis_name"] = axis_name
        if for_training and config.get("ghost_batch_size") is not None:
            options["ghost_batch_size"] = config.ghost_batch_size
    common = dict(
        num_classes=num_classes,
        norm=config.norm,
        norm_groups=config.norm_groups,
        norm_options=options,
        dtype=jnp.bfloat16 if config.mixed_precision else jnp.float32,
    )
    # An unknown name reaches build_model, whose error lists the models.
    takes_widths = models.MODELS.get(config.model, (None, False))[1]
    return models.build_model(
        config.model,
        features=tuple(config.model_features) if takes_widths else None,
        zero_init_residual=config.zero_init_residual,
        **common,
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


def make_train_step(model, optimizer, *, telemetry: bool):
    """`train_step(state, batch, axis_name) -> (state, metrics)` for `bnjax.parallel`.

    Metrics: 'loss' (global mean cross-entropy), 'accuracy', and with `telemetry` each BN
    layer's drift and skipped-update count from `bnjax.diagnostics` (jit mode only: under
    shard_map/pmap they would differ per device).
    """
    mutable = list(STATE_COLLECTIONS)

    def loss_fn(params, state, batch, axis_name):
        record = telemetry and axis_name is None
        names = mutable + (["bn_telemetry"] if record else [])
        apply = lambda: model.apply(  # noqa: E731
            _variables(state, params), batch["image"], train=True, mutable=names
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
