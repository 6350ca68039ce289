"""The model, its training state, and the per-device train and evaluation steps.

The state is a plain dict pytree, so it checkpoints as is:

    {"step": int32 scalar, "params": ..., "batch_stats": ..., "opt_state": ...}

('batch_stats' is absent for norms without running statistics; with an averaged model, the
key 'ema' holds it: `bnjax.train.averaged_model`, updated by the step with `ema_decay` > 0.) One
`train_step(state, batch, axis_name)` serves every parallel mode of `bnjax.parallel`: under
`jit` (`axis_name=None`) batch norm's statistics are global by construction; under `shard_map`
or `pmap` the model's norms sync over `axis_name` and the gradient is averaged over devices.

With `check_finite=True` the step also says, at a cost of one reduction per leaf, which
floating leaves of the new state (and of the gradient) hold a NaN/inf (`FINITE_CHECK`): a
NaN pixel can leave the loss finite while the first layer's parameters are already lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from bnjax import RenormSchedule, diagnostics, models, parallel
from bnjax import linen as bnn
from bnjax.train.averaged_model import update_average

STATE_COLLECTIONS = ("batch_stats",)

FINITE_CHECK = "finite_check"
"""The metrics key of `make_train_step(check_finite=True)`: {'leaves': (L,) bool, True where
leaf l of `checked_leaf_names` holds a NaN/inf, 'inputs': int32 count of the batch's NaN/inf
input values}. Not a scalar: pop it before logging."""


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
    renorm_schedule: RenormSchedule | None = None,
    for_training: bool = True,
    conv: str = "plain",
):
    """The model `name` of `bnjax.models.MODELS` with the norm `norm` of `bnjax.models.NORMS`.

    Batch-statistics norms get `bn_momentum`, `axis_name` (sync over devices),
    `ghost_batch_size` and `norm_options` (any other module option); per-example norms take
    none of them. `features` are the widths of the models that take them (ignored by the
    others), `mixed_precision` computes in bfloat16 (parameters stay float32),
    `renorm_schedule` is the warm-up of 'batch_renorm' (see `renorm_schedule`; None: the
    module's default, the paper's 5k-step one), `conv` the convolution of the conv models (a
    name of `bnjax.models.CONVS`).

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
        if norm == "batch_renorm" and renorm_schedule is not None:
            options["schedule"] = renorm_schedule
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
        conv=conv,
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


def renorm_schedule(
    num_steps: int,
    *,
    warmup_steps: int | None = None,
    r_relax_steps: int | None = None,
    d_relax_steps: int | None = None,
) -> RenormSchedule:
    """Batch renorm's warm-up scaled to a run of `num_steps` steps, for the steps not given.

    The paper's shape (plain batch norm for 5k steps, then r_max 1 -> 3 over 35k steps and
    d_max 0 -> 5 over 20k) in proportion to the run, with the fractions the study uses:
    warm-up num_steps // 10, r relaxed over num_steps // 2 steps, d over 3 * num_steps // 10.
    The fixed default, `RenormSchedule()`, would keep any run shorter than 5000 steps at plain
    batch norm.

    Example:
      >>> schedule = renorm_schedule(600)
      >>> schedule.warmup_steps, schedule.r_relax_steps, schedule.d_relax_steps
      (60, 300, 180)
    """
    derived = (num_steps // 10, num_steps // 2, 3 * num_steps // 10)
    given = (warmup_steps, r_relax_steps, d_relax_steps)
    warmup, r_relax, d_relax = (d if g is None else g for g, d in zip(given, derived, strict=True))
    return RenormSchedule(warmup_steps=warmup, r_relax_steps=r_relax, d_relax_steps=d_relax)


def renorm_engages(schedule: RenormSchedule, num_steps: int) -> bool:
    """Whether `schedule` moves off plain batch norm (r_max > 1 or d_max > 0) within a run of
    `num_steps` steps. Training step t runs with the bounds at the layer's step t - 1 (the
    finite batches seen before it), so the last step sees `schedule.bounds(num_steps - 1)`.

    Example:
      >>> renorm_engages(RenormSchedule(), 600), renorm_engages(renorm_schedule(600), 600)
      (False, True)
    """
    r_max, d_max = schedule.bounds(num_steps - 1)
    return bool(r_max > 1.0 or d_max > 0.0)


def _variables(state, params=None) -> dict:
    variables = {"params": state["params"] if params is None else params}
    variables.update({c: state[c] for c in STATE_COLLECTIONS if c in state})
    return variables


def _checked_groups(state, grads) -> list[tuple[str, Any]]:
    """What the finite check covers, in the order it reports: the new parameters, the
    statistics, the optimizer state, then the gradient (where a NaN usually enters)."""
    groups = [("params", state["params"])]
    groups += [(c, state[c]) for c in STATE_COLLECTIONS if c in state]
    return groups + [("opt_state", state["opt_state"]), ("grads", grads)]


def _floating(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def checked_leaf_names(state) -> list[str]:
    """Names of the leaves `FINITE_CHECK` flags, in its order: 'params/conv0/kernel', ...,
    'batch_stats/...', 'opt_state/...', 'grads/conv0/kernel', ... (floating leaves only;
    the gradient has the parameters' tree)."""
    names = []
    for group, tree in _checked_groups(state, state["params"]):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if _floating(leaf):
                names.append(f"{group}/{jax.tree_util.keystr(path, simple=True, separator='/')}")
    return names


def _nonfinite_leaves(state, grads) -> jax.Array:
    """(L,) bool: whether each leaf of `checked_leaf_names` holds a NaN/inf."""
    flags = [
        ~jnp.all(jnp.isfinite(leaf))
        for _, tree in _checked_groups(state, grads)
        for leaf in jax.tree.leaves(tree)
        if _floating(leaf)
    ]
    return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


def _reported_telemetry(summaries: dict, batch_stats) -> dict:
    """The per-layer telemetry a training step logs: drift, the channels whose batch
    statistics were not finite (a layer with any left its running statistics as they were),
    and the skipped-update count of the layers that keep counters (the others would report
    -1, which is not a count)."""
    counting = {
        "/".join(path[:-1])
        for path in traverse_util.flatten_dict(dict(batch_stats))
        if path[-1] == "skipped"
    }
    reported = {}
    for key, value in summaries.items():
        layer, field = key.removeprefix("bn/").rsplit("/", 1)
        if field in ("drift", "nonfinite") or (field == "skipped" and layer in counting):
            reported[key] = value
    return reported


def make_train_step(
    model,
    optimizer,
    *,
    telemetry: bool = False,
    check_finite: bool = False,
    ema_decay: float = 0.0,
):
    """`train_step(state, batch, axis_name) -> (state, metrics)` for `bnjax.parallel`.

    `batch` is {'image': (N, ...), 'label': (N,)}. Metrics: 'loss' (global mean cross-entropy),
    'accuracy', with `telemetry` each BN layer's drift, its number of channels with
    non-finite batch statistics ('bn/<layer>/nonfinite': > 0 means the layer skipped this
    batch's update) and, for layers that keep counters, its skipped-update count, from
    `bnjax.diagnostics` (jit mode only: under shard_map/pmap they would differ per device),
    and with `check_finite` the `FINITE_CHECK` flags (the same on every device). With
    `ema_decay` > 0 and a state holding an averaged model ('ema', from
    `bnjax.train.averaged_model.add_average`) the step moves that average toward its new
    parameters and statistics (`bnjax.lifecycle.ema`).

    Everything the step computes passes through `model.apply` (the forward pass) and
    `optimizer.update` (the gradient in, the parameters' change out): code that measures
    training wraps those (as `bnjax.study.training` does) rather than changing the step.
    """
    mutable = list(STATE_COLLECTIONS)

    def loss_fn(params, state, batch, axis_name, probes=None):
        record = telemetry and axis_name is None
        names = mutable + (["bn_telemetry"] if record else [])
        variables = _variables(state, params)
        if probes:
            variables[bnn.PROBE_COLLECTION] = probes
        apply = lambda: model.apply(  # noqa: E731
            variables,
            batch["image"],
            train=True,
            mutable=names,
        )
        if record:
            with diagnostics.telemetry():
                logits, updates = apply()
        else:
            logits, updates = apply()
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, updates)

    def train_step(state, batch, axis_name):
        # Moving-average batch norms pass their backward statistics out through the gradient
        # of zero probes; other models have none and take the plain path.
        probes = bnn.backward_probes(state.get("batch_stats", {}))
        if probes:
            grad_fn = parallel.data_parallel_value_and_grad(
                lambda both, *args: loss_fn(both[0], *args, probes=both[1]),
                axis_name,
                has_aux=True,
            )
            (loss, (logits, updates)), (grads, probe_grads) = grad_fn(
                (state["params"], probes), state, batch, axis_name
            )
            updates = dict(updates)
            updates["batch_stats"] = bnn.apply_backward_statistics(
                updates["batch_stats"], probe_grads
            )
        else:
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
        if ema_decay:
            # After the update: the average follows the weights (and synced statistics) that
            # every device holds alike, so it is the same on every device too.
            new_state = update_average(new_state, ema_decay)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name is not None:
            accuracy = lax.pmean(accuracy, axis_name)
        metrics = {"loss": loss, "accuracy": accuracy}
        if "bn_telemetry" in updates:
            # Drift and skipped batches per layer; the other summaries stay a call away
            # (bnjax.diagnostics) rather than swelling every log line.
            summaries = diagnostics.summaries(updates["bn_telemetry"])
            metrics.update(_reported_telemetry(summaries, state.get("batch_stats", {})))
        if check_finite:
            # The gradient and the new state are replicated (averaged, synced) by now, so the
            # flags are the same on every device; the input count is summed over them.
            inputs = jnp.sum(~jnp.isfinite(batch["image"]), dtype=jnp.int32)
            if axis_name is not None:
                inputs = lax.psum(inputs, axis_name)
            metrics[FINITE_CHECK] = {
                "leaves": _nonfinite_leaves(new_state, grads),
                "inputs": inputs,
            }
        return new_state, metrics

    return train_step


class EvalCounts(NamedTuple):
    """What `make_eval_step`'s step counts over one batch's valid examples (int32 scalars).

    running, batch: correct predictions with running / batch statistics; nonfinite_inputs:
    examples with a NaN/inf input value; nonfinite_running, nonfinite_batch: examples whose
    logits are not finite in each evaluation (whatever argmax then picks is not a prediction).
    """

    running: jax.Array
    batch: jax.Array
    nonfinite_inputs: jax.Array
    nonfinite_running: jax.Array
    nonfinite_batch: jax.Array


def make_eval_step(model):
    """`eval_step(state, images, labels, valid=None) -> EvalCounts` (correct with running
    stats, with batch stats, then the non-finite inputs and outputs met), counted over the
    examples where `valid` (N,) is True (all when None).

    Evaluation mode normalizes with the running statistics (what serving sees); the second
    count normalizes each evaluation batch with its own statistics (training mode, state
    discarded), so the gap between the two is the cost of the running averages. Rows where
    `valid` is False (padding) are left out of those batch statistics and of every count. One
    NaN example reaches only its own output with running statistics, but the statistics of
    its whole batch with batch statistics; the non-finite counts say that it was there (XLA
    on CPU may turn a NaN into a finite, wrong, output on its way through the network).
    """

    @jax.jit
    def eval_step(state, images, labels, valid=None):
        variables = _variables(state)
        running = model.apply(variables, images, train=False)
        batch, _ = model.apply(
            variables, images, train=True, mask=valid, mutable=list(STATE_COLLECTIONS)
        )
        keep = jnp.ones(labels.shape, bool) if valid is None else valid

        def count(per_example):
            return jnp.sum(per_example & keep, dtype=jnp.int32)

        def nonfinite(values):
            return count(~jnp.all(jnp.isfinite(values.reshape(len(values), -1)), axis=1))

        return EvalCounts(
            running=count(jnp.argmax(running, -1) == labels),
            batch=count(jnp.argmax(batch, -1) == labels),
            nonfinite_inputs=nonfinite(images),
            nonfinite_running=nonfinite(running),
            nonfinite_batch=nonfinite(batch),
        )

    return eval_step
