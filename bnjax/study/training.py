"""One training run of the study, with everything the Table 1 columns need recorded per step.

The training set sits on the device and each step gathers its rows from a precomputed (T, B)
index array (the sampler's batches), so no batch is copied from the host. Each step records

    loss[t]                        mean cross-entropy of batch t                    ()
    accuracy[t]                    training accuracy of batch t                     ()
    batch_means[l][t], batch_vars[l][t]
                                   per-channel mean and biased variance of layer l's
                                   norm input (its conv output) over batch t        (C_l,)
    grad_pair[t], update_pair[t]   (1 - cos, relative change) of gradient g_t vs g_{t-1} and
                                   of weight update u_t vs u_{t-1}; NaN at t = 0     (2,)

The layer statistics are those of the norm's *input*, the same quantity for every normalizer,
so batch norm and its alternatives are measured on one scale. The pair metrics follow
`bnjax.study.update_pair` (computed here in float32, on device).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bnjax.train.steps import STATE_COLLECTIONS, StepInternals, make_train_step


class Trace(NamedTuple):
    """What one run recorded per step (NumPy, T steps); see the module docstring.

    Example (`make_trainer` shows one from a real run):
      >>> t = Trace(np.zeros(3), np.ones(3), (np.zeros((3, 8)),), (np.ones((3, 8)),),
      ...           np.full((3, 2), np.nan), np.full((3, 2), np.nan))
      >>> len(t.loss), t.batch_means[0].shape
      (3, (3, 8))
    """

    loss: np.ndarray  # (T,)
    accuracy: np.ndarray  # (T,)
    batch_means: tuple[np.ndarray, ...]  # per norm layer, (T, C_l)
    batch_vars: tuple[np.ndarray, ...]  # per norm layer, (T, C_l)
    grad_pair: np.ndarray  # (T, 2): (1 - cos, relative change) of g_t vs g_{t-1}
    update_pair: np.ndarray  # (T, 2): the same for the weight updates


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


def make_trainer(model: nn.Module, optimizer: optax.GradientTransformation):
    """`train(state, images, labels, rows) -> (state, record)`: one jitted step per row, each
    `bnjax.train.steps.make_train_step`'s step plus the records of the module docstring.

    `state` is `bnjax.train.steps.initial_state`'s dict, `images` (N, H, W, C) and `labels`
    (N,) the whole training set, `rows` (T, B) int32: row t lists batch t's examples. The
    state's buffers are donated: keep a copy if you need the initial state afterwards.

    Example:
      >>> from bnjax.models import SmallCNN
      >>> from bnjax.train.steps import initial_state
      >>> model = SmallCNN(features=(4, 8), num_classes=3)
      >>> images = jax.random.normal(jax.random.key(0), (12, 8, 8, 1))
      >>> labels = jnp.arange(12) % 3
      >>> optimizer = optax.sgd(0.1)
      >>> state = initial_state(model, optimizer, images[:2], seed=0)
      >>> rows = np.arange(12, dtype=np.int32).reshape(3, 4)       # 3 steps of 4 examples
      >>> state, record = make_trainer(model, optimizer)(state, images, labels, rows)
      >>> trace = to_trace(record)
      >>> int(state["step"]), trace.loss.shape, [m.shape for m in trace.batch_means]
      (3, (3,), [(3, 4), (3, 8)])
      >>> bool(np.isnan(trace.grad_pair[0]).all()), bool(np.isfinite(trace.grad_pair[1:]).all())
      (True, True)
    """

    def record(internals: StepInternals) -> dict:
        inputs = norm_inputs(internals.intermediates)
        return {
            "batch_means": tuple(jnp.mean(x, axis=(0, 1, 2)) for x in inputs),
            "batch_vars": tuple(jnp.var(x, axis=(0, 1, 2)) for x in inputs),
            "grads": internals.grads,
            "update": internals.changes,
        }

    # The training package's step (one device: axis_name None), recording the norm inputs.
    train_step = make_train_step(
        model, optimizer, capture_intermediates=is_conv_call, extras=record
    )

    def step(carry, rows, images, labels):
        state, previous_grads, previous_update = carry
        state, metrics = train_step(state, {"image": images[rows], "label": labels[rows]}, None)
        grads, update = metrics.pop("grads"), metrics.pop("update")
        metrics["grad_pair"] = _pair(previous_grads, grads)
        metrics["update_pair"] = _pair(previous_update, update)
        return (state, grads, update), metrics

    # One jitted step in a Python loop rather than one `lax.scan`: XLA:CPU runs convolutions
    # inside a while loop ~20x slower than the same step jitted alone (measured: 58 vs 3 ms
    # per step of the study's net at batch 32), and dispatch is asynchronous anyway.
    jitted_step = jax.jit(step, donate_argnums=0)

    def train(state, images, labels, rows):
        def zeros():  # a fresh buffer each: the step donates its carry
            return jax.tree.map(jnp.zeros_like, state["params"])

        carry, records = (state, zeros(), zeros()), []
        for batch_rows in rows:
            carry, record = jitted_step(carry, batch_rows, images, labels)
            records.append(record)
        return carry[0], jax.tree.map(lambda *steps: jnp.stack(steps), *records)

    return train


def to_trace(record) -> Trace:
    """The trainer's stacked per-step record, on the host as a float64 `Trace` (example:
    `make_trainer`).

    Example:
      >>> r = {"loss": jnp.ones(2), "accuracy": jnp.zeros(2), "batch_means": (jnp.zeros((2, 4)),),
      ...      "batch_vars": (jnp.ones((2, 4)),), "grad_pair": jnp.zeros((2, 2)),
      ...      "update_pair": jnp.zeros((2, 2))}
      >>> to_trace(r).loss.dtype
      dtype('float64')
    """
    r = jax.device_get(record)
    return Trace(
        loss=np.asarray(r["loss"], np.float64),
        accuracy=np.asarray(r["accuracy"], np.float64),
        batch_means=tuple(np.asarray(m, np.float64) for m in r["batch_means"]),
        batch_vars=tuple(np.asarray(v, np.float64) for v in r["batch_vars"]),
        grad_pair=np.asarray(r["grad_pair"], np.float64),
        update_pair=np.asarray(r["update_pair"], np.float64),
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
