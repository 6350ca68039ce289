"""Training runs of the study, every seed of a cell at once, with what the metrics need.

The training set sits on the device and each step gathers its rows from a precomputed
(S, T, B) index array (each seed's sampler batches), so no batch is copied from the host; the
S seeds of a cell train together, vmapped. Each step records, per seed,

    loss[t]                        mean cross-entropy of batch t                    ()
    accuracy[t]                    training accuracy of batch t                     ()
    batch_means[l][t], batch_vars[l][t]
                                   per-channel mean and biased variance of layer l's
                                   norm input (its conv output) over batch t        (C_l,)
    grad_pair[t], update_pair[t]   (1 - cos, relative change) of gradient g_t vs g_{t-1} and
                                   of weight update u_t vs u_{t-1}; NaN at t = 0     (2,)

The layer statistics are those of the norm's *input*, the same quantity for every normalizer,
so batch norm and its alternatives are measured on one scale. The pair metrics follow
`bnjax.study.update_pair` (computed here in float32, on device). Besides, a fixed held-out
probe is evaluated in evaluation mode at evenly spaced steps (`probe_schedule`): the
convergence curves that do not read the training batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bnjax.train.steps import STATE_COLLECTIONS, make_train_step


class Trace(NamedTuple):
    """What one seed's run recorded (NumPy, T steps, P probe points); see the module docstring
    (`make_trainer`'s example makes one from a real run)."""

    loss: np.ndarray  # (T,)
    accuracy: np.ndarray  # (T,)
    batch_means: tuple[np.ndarray, ...]  # per norm layer, (T, C_l)
    batch_vars: tuple[np.ndarray, ...]  # per norm layer, (T, C_l)
    grad_pair: np.ndarray  # (T, 2): (1 - cos, relative change) of g_t vs g_{t-1}
    update_pair: np.ndarray  # (T, 2): the same for the weight updates
    probe_steps: np.ndarray  # (P,) steps taken before each probe evaluation (0 first)
    probe_loss: np.ndarray  # (P,) held-out loss in evaluation mode
    probe_accuracy: np.ndarray  # (P,) held-out accuracy in evaluation mode


def is_conv_call(module, method_name: str) -> bool:
    """`capture_intermediates` filter: every conv's output (the norm input that follows it).

    Example:
      >>> from bnjax.models import SmallCNN
      >>> model = SmallCNN(features=(4, 8), num_classes=3)
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> _, sown = model.apply(variables, x, train=False, mutable=["intermediates"],
      ...                       capture_intermediates=is_conv_call)
      >>> [a.shape for a in norm_inputs(sown["intermediates"])]
      [(2, 8, 8, 4), (2, 4, 4, 8)]
    """
    # The study's models put a norm right after every conv: the conv's output is its input.
    return isinstance(module, nn.Conv) and method_name == "__call__"


def norm_inputs(intermediates) -> list[jax.Array]:
    """The captured conv outputs (the norm inputs), ordered by depth (conv0, conv1, ..., conv10).

    Example:
      >>> norm_inputs({"conv10": {"__call__": ("c",)}, "conv2": {"__call__": ("b",)},
      ...              "conv0": {"__call__": ("a",)}, "features": ("f",)})
      ['a', 'b', 'c']
    """
    names = sorted((n for n in intermediates if n.startswith("conv")), key=lambda n: int(n[4:]))
    return [intermediates[n]["__call__"][0] for n in names]


def _pair(previous, current):
    """(1 - cos, |v - u| / (|u| + |v|)) of two pytrees; NaN when either is all zeros."""
    u, v = ravel_pytree(previous)[0], ravel_pytree(current)[0]
    nu, nv = jnp.linalg.norm(u), jnp.linalg.norm(v)
    defined = (nu > 0) & (nv > 0)
    safe_u, safe_v = u / jnp.where(defined, nu, 1.0), v / jnp.where(defined, nv, 1.0)
    one_minus_cos = jnp.sum((safe_u - safe_v) ** 2) / 2
    relative = jnp.linalg.norm(v - u) / jnp.where(defined, nu + nv, 1.0)
    return jnp.where(defined, jnp.stack([one_minus_cos, relative]), jnp.nan)


class Recorded(NamedTuple):
    """The state of `recording(optimizer)`: the optimizer's own state, and the gradient and the
    update (the change added to the parameters) of the step that produced it, both shaped as
    the parameters (zeros before the first step)."""

    inner: Any
    grads: Any
    update: Any


def recording(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer`, with its last gradient and update kept in its state (`Recorded`).

    The train step hands every gradient to the optimizer and applies the update it returns, so
    this is where the study reads both without a hook in the step: the updates are the
    optimizer's own, bit for bit, and the state carries the previous step's pair to compare
    with (the `make_trainer` pair metrics).

    Example:
      >>> tracked = recording(optax.sgd(0.5))
      >>> state = tracked.init({"w": jnp.ones(2)})
      >>> update, state = tracked.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> update["w"].tolist(), state.grads["w"].tolist(), state.update["w"].tolist()
      ([-0.5, 1.0], [1.0, -2.0], [-0.5, 1.0])
    """

    def init(params):
        return wrap(optimizer.init(params), params)

    def update(grads, state, params=None):
        changes, inner = optimizer.update(grads, state.inner, params)
        return changes, Recorded(inner, grads, changes)

    return optax.GradientTransformation(init, update)


def wrap(opt_state, params) -> Recorded:
    """`opt_state` (of the plain optimizer) as `recording`'s state before any step."""
    # Two buffers: the trainer donates the state, and one buffer cannot be donated twice.
    return Recorded(
        opt_state, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
    )


MOMENTS = "norm_input_moments"
"""The entry of 'batch_stats' where `RecordingModel` returns the moments of its norm inputs
(no module is named so)."""


class RecordingModel:
    """`model` whose training forward pass also returns, in the 'batch_stats' it updates, the
    moments of its norm inputs over the batch (`MOMENTS`: {'batch_means', 'batch_vars'}, per
    norm layer by depth, the per-channel mean and biased variance (C_l,) of the layer's input).

    The train step keeps the 'batch_stats' the model returns as the new state's, so the moments
    come out of the very forward pass the step differentiates (a second forward pass on the
    same state is not bit-identical: XLA fuses the norms differently in it) without a hook in
    the step. The model gets its own variables: an entry `MOMENTS` in the input is left out,
    and an empty 'batch_stats' (norms without running statistics) too.

    Example:
      >>> from bnjax.models import SmallCNN
      >>> model = SmallCNN(features=(4, 8), num_classes=3)
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> _, updates = RecordingModel(model).apply(variables, x, train=True,
      ...                                           mutable=["batch_stats"])
      >>> [m.shape for m in updates["batch_stats"][MOMENTS]["batch_means"]]
      [(4,), (8,)]
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def apply(self, variables, images, *, train: bool, mutable):
        variables = dict(variables)
        stats = {k: v for k, v in variables.pop("batch_stats", {}).items() if k != MOMENTS}
        if stats:
            variables["batch_stats"] = stats
        logits, updates = self.model.apply(
            variables,
            images,
            train=train,
            mutable=[*mutable, "intermediates"],
            capture_intermediates=is_conv_call,
        )
        updates = dict(updates)
        inputs = norm_inputs(updates.pop("intermediates"))
        moments = {
            "batch_means": tuple(jnp.mean(x, axis=(0, 1, 2)) for x in inputs),
            "batch_vars": tuple(jnp.var(x, axis=(0, 1, 2)) for x in inputs),
        }
        updates["batch_stats"] = {**updates.get("batch_stats", {}), MOMENTS: moments}
        return logits, updates


def make_trainer(model: nn.Module, eval_model: nn.Module, optimizer: optax.GradientTransformation):
    """`train(states, images, labels, rows, probe, probe_after) -> (states, record, curve)`:
    one jitted step per row, every seed at once (vmapped), each seed's step
    `bnjax.train.steps.make_train_step`'s, instrumented from outside: its model is
    `RecordingModel(model)` (the layer statistics of its forward pass) and its optimizer
    `recording(optimizer)` (its gradient and update). Both leave the step's arithmetic as it
    is: the states follow the plain step's bit for bit.

    `states` are `bnjax.train.steps.initial_state` dicts of `optimizer` stacked over S seeds,
    `images` (N, H, W, C) and `labels` (N,) the whole training set, `rows` (S, T, B) int32:
    row [s, t] lists seed s's batch t. `probe` = (images (P, ...), labels (P,)) is a fixed
    held-out set, evaluated in evaluation mode (`eval_model`, no ghost batches) before training
    and after each step listed in `probe_after`: `curve` holds 'loss' and 'accuracy'
    (S, len(probe_after) + 1). The record's arrays are (S, T, ...); the returned states are
    `optimizer`'s, as given. The states' buffers are donated.

    Example:
      >>> from bnjax.models import SmallCNN
      >>> from bnjax.train.steps import initial_state
      >>> model = SmallCNN(features=(4, 8), num_classes=3)
      >>> images = jax.random.normal(jax.random.key(0), (12, 8, 8, 1))
      >>> labels = jnp.arange(12) % 3
      >>> optimizer = optax.sgd(0.1)
      >>> states = stack_states([initial_state(model, optimizer, images[:2], seed=s)
      ...                        for s in (0, 1)])
      >>> rows = np.arange(12, dtype=np.int32).reshape(1, 3, 4).repeat(2, axis=0)  # 2 seeds
      >>> train = make_trainer(model, model, optimizer)
      >>> states, record, curve = train(states, images, labels, rows, (images, labels), [1, 3])
      >>> trace = to_trace(record, curve, seed=1)
      >>> trace.loss.shape, [m.shape for m in trace.batch_means], trace.probe_loss.shape
      ((3,), [(3, 4), (3, 8)], (3,))
      >>> bool(np.isnan(trace.grad_pair[0]).all()), bool(np.isfinite(trace.grad_pair[1:]).all())
      (True, True)
    """
    # The training package's step (one device: axis_name None), as bnjax.train runs it.
    train_step = make_train_step(RecordingModel(model), recording(optimizer))

    def step(state, rows, images, labels):
        batch = {"image": images[rows], "label": labels[rows]}
        previous = state["opt_state"]
        # The step keeps 'batch_stats' only where the state has them: an empty one for norms
        # without running statistics, so that the recorded moments come back.
        state, metrics = train_step({"batch_stats": {}, **state}, batch, None)
        stats = dict(state.pop("batch_stats"))
        metrics.update(stats.pop(MOMENTS))
        if stats:
            state["batch_stats"] = stats
        metrics["grad_pair"] = _pair(previous.grads, state["opt_state"].grads)
        metrics["update_pair"] = _pair(previous.update, state["opt_state"].update)
        return state, metrics

    # One jitted step in a Python loop rather than one `lax.scan`: XLA:CPU runs convolutions
    # inside a while loop ~20x slower than the same step jitted alone (measured: 58 vs 3 ms
    # per step of the study's net at batch 32), and dispatch is asynchronous anyway. The
    # seeds share each dispatch (vmap), which is what makes small batches affordable.
    jitted_step = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)), donate_argnums=0)

    def probe_one(state, probe_images, probe_labels):
        variables = {k: v for k, v in state.items() if k not in ("step", "opt_state")}
        logits = eval_model.apply(variables, probe_images, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, probe_labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == probe_labels)

    jitted_probe = jax.jit(jax.vmap(probe_one, in_axes=(0, None, None)))

    def train(states, images, labels, rows, probe, probe_after):
        after = set(int(t) for t in probe_after)
        curve = [jitted_probe(states, *probe)]
        state = {**states, "opt_state": wrap(states["opt_state"], states["params"])}
        records = []
        for t in range(rows.shape[1]):
            state, step_record = jitted_step(state, rows[:, t], images, labels)
            records.append(step_record)
            if t + 1 in after:
                curve.append(jitted_probe(state, *probe))
        stacked = jax.tree.map(lambda *steps: jnp.stack(steps, axis=1), *records)
        losses, accuracies = zip(*curve, strict=True)
        return (
            {**state, "opt_state": state["opt_state"].inner},
            stacked,
            {"loss": jnp.stack(losses, 1), "accuracy": jnp.stack(accuracies, 1)},
        )

    return train


def stack_states(states: list[dict]) -> dict:
    """One state pytree with a leading seed axis from per-seed states (`make_trainer`).

    Example:
      >>> stack_states([{"w": jnp.zeros(3)}, {"w": jnp.ones(3)}])["w"].shape
      (2, 3)
    """
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def probe_schedule(num_steps: int, points: int) -> list[int]:
    """The steps after which the probe is evaluated: `points` steps spread evenly over the run,
    the last one included (and step 0, before training, by `make_trainer`).

    Example:
      >>> probe_schedule(300, 4), probe_schedule(3, 10)
      ([75, 150, 225, 300], [1, 2, 3])
    """
    points = min(points, num_steps)
    return sorted({round(num_steps * (i + 1) / points) for i in range(points)})


def to_trace(record, curve, seed: int, probe_after=None) -> Trace:
    """Seed `seed`'s part of the trainer's stacked record and probe curve, on the host as a
    float64 `Trace` (example: `make_trainer`). `probe_after` are the trainer's probe steps
    (None: 1, 2, ...).

    Example:
      >>> r = {"loss": jnp.ones((1, 2)), "accuracy": jnp.zeros((1, 2)),
      ...      "batch_means": (jnp.zeros((1, 2, 4)),), "batch_vars": (jnp.ones((1, 2, 4)),),
      ...      "grad_pair": jnp.zeros((1, 2, 2)), "update_pair": jnp.zeros((1, 2, 2))}
      >>> c = {"loss": jnp.ones((1, 2)), "accuracy": jnp.zeros((1, 2))}
      >>> t = to_trace(r, c, seed=0, probe_after=[2])
      >>> t.loss.dtype, t.probe_steps.tolist()
      (dtype('float64'), [0, 2])
    """
    r = jax.device_get(jax.tree.map(lambda a: a[seed], record))
    c = jax.device_get(jax.tree.map(lambda a: a[seed], curve))
    points = len(c["loss"])
    steps = list(range(points)) if probe_after is None else [0, *sorted(probe_after)]
    return Trace(
        loss=np.asarray(r["loss"], np.float64),
        accuracy=np.asarray(r["accuracy"], np.float64),
        batch_means=tuple(np.asarray(m, np.float64) for m in r["batch_means"]),
        batch_vars=tuple(np.asarray(v, np.float64) for v in r["batch_vars"]),
        grad_pair=np.asarray(r["grad_pair"], np.float64),
        update_pair=np.asarray(r["update_pair"], np.float64),
        probe_steps=np.asarray(steps, np.int64),
        probe_loss=np.asarray(c["loss"], np.float64),
        probe_accuracy=np.asarray(c["accuracy"], np.float64),
    )


def make_evaluator(model: nn.Module):
    """`evaluate(variables, images) -> (running logits, batch-statistics logits, features)`.

    Running: evaluation mode, what serving sees. Batch statistics: training mode on the batch
    (state discarded). Features: the penultimate features in evaluation mode (the models sow
    them as 'intermediates/features'). Shapes (N, K), (N, K), (N, D).

    Example:
      >>> from bnjax.models import SmallCNN
      >>> model = SmallCNN(features=(4, 8), num_classes=3)
      >>> x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> [a.shape for a in make_evaluator(model)(variables, x)]
      [(6, 3), (6, 3), (6, 8)]
    """

    @jax.jit
    def evaluate(variables, images):
        running, sown = model.apply(variables, images, train=False, mutable=["intermediates"])
        batch, _ = model.apply(variables, images, train=True, mutable=list(STATE_COLLECTIONS))
        return running, batch, sown["intermediates"]["features"][0]

    return evaluate
