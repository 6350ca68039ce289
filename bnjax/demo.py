"""A one-minute tour of bnjax's functional core: ``python -m bnjax.demo``.

1. Batch norm as a pure function: the running statistics go in and come back out.
2. Stable statistics: inputs whose mean is 1000x their std, bnjax vs the naive E[x^2]-E[x]^2.
3. The research question in miniature: the same MLP with batch norm trained on the same
   generated data, with uniformly shuffled batches and with class-clustered batches (each batch
   holds one class), then evaluated with running statistics and with batch statistics.

Everything runs on the CPU in well under a minute; the data are generated from the seed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax

NUM_CLASSES, SUBCLUSTERS, DIM, HIDDEN = 4, 3, 16, 64


def make_clusters(seed: int, per_class: int, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classes that are each a mixture of Gaussian sub-clusters: (x (N, DIM), y (N,)), shuffled.

    The cluster centres depend on `seed` only; `draw` picks an independent sample of points
    from the same distribution (0 for training, 1 for the held-out set).
    """
    centers = np.random.default_rng(seed).normal(0.0, 2.0, (NUM_CLASSES, SUBCLUSTERS, DIM)) + 3.0
    rng = np.random.default_rng([seed, draw])
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    which = rng.integers(0, SUBCLUSTERS, labels.size)
    x = centers[labels, which] + rng.normal(0.0, 1.0, (labels.size, DIM))
    order = rng.permutation(labels.size)
    return x[order].astype(np.float32), labels[order]


def batch_order(labels: np.ndarray, batch: int, clustered: bool, rng) -> np.ndarray:
    """Indices of one epoch as (num_batches, batch): shuffled, or one class per batch."""
    if not clustered:
        order = rng.permutation(labels.size)
        return order[: labels.size // batch * batch].reshape(-1, batch)
    batches = []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == label))
        batches.extend(members[: members.size // batch * batch].reshape(-1, batch))
    return np.stack(batches)[rng.permutation(len(batches))]


def init_mlp(key) -> tuple[dict, list[bnjax.BatchNormState]]:
    """He-initialised params of `mlp` and its two fresh batch-norm states."""
    sizes = [(DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, NUM_CLASSES)]
    keys = jax.random.split(key, len(sizes))
    params = {
        f"dense{i}": jax.random.normal(k, shape) * jnp.sqrt(2.0 / shape[0])
        for i, (k, shape) in enumerate(zip(keys, sizes, strict=True))
    }
    params |= {"bias2": jnp.zeros(NUM_CLASSES)}
    for i in range(2):
        params[f"scale{i}"], params[f"shift{i}"] = jnp.ones(HIDDEN), jnp.zeros(HIDDEN)
    return params, [bnjax.batch_norm_state(HIDDEN) for _ in range(2)]


def mlp(params, states, x, training: bool):
    """dense -> BN -> relu, twice, then a linear classifier; returns (logits, new states)."""
    new_states = []
    for i, state in enumerate(states):
        x = x @ params[f"dense{i}"]
        x, state = bnjax.batch_norm(
            x, state, params[f"scale{i}"], params[f"shift{i}"], training=training, momentum=0.95
        )
        new_states.append(state)
        x = jax.nn.relu(x)
    return x @ params["dense2"] + params["bias2"], new_states


def train(x, y, clustered: bool, steps: int, batch: int, seed: int):
    """SGD on `mlp` with shuffled or one-class batches: (params, states, per-step losses)."""
    params, states = init_mlp(jax.random.key(seed))
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, states, opt_state, xb, yb):
        def loss_fn(params):
            logits, new_states = mlp(params, states, xb, training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_states

        (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), states, opt_state, loss

    rng = np.random.default_rng(seed)
    order = np.zeros((0, batch), int)
    losses = []
    for _ in range(steps):
        if not len(order):
            order = batch_order(y, batch, clustered, rng)
        indices, order = order[0], order[1:]
        params, states, opt_state, loss = step(params, states, opt_state, x[indices], y[indices])
        losses.append(float(loss))
    return params, states, np.array(losses)


def population_drift(params, states, x) -> float:
    """Mean |running - population| / population std of the first BN layer's inputs."""
    features = np.asarray(x @ params["dense0"], np.float64)
    mean, std = features.mean(0), features.std(0)
    running_mean = np.asarray(states[0].mean)
    running_std = np.sqrt(np.asarray(states[0].var))
    return float(np.mean((np.abs(running_mean - mean) + np.abs(running_std - std)) / std))


def accuracy(logits, labels) -> float:
    """Fraction of rows whose largest logit is the label."""
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def tour_functional_core() -> None:
    """Part 1: a batch-norm step on a tiny batch, and the non-finite guard."""
    print("1) Batch norm is a pure function; its running statistics are a value.")
    x = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    state = bnjax.batch_norm_state(2)
    y, state = bnjax.batch_norm(x, state, training=True, momentum=0.9)
    print(f"   x columns have means {np.asarray(x.mean(0))}; y means {np.asarray(y.mean(0))}")
    print(
        f"   new state: mean={np.asarray(state.mean)} var={np.asarray(state.var)} "
        f"count={int(state.count)}"
    )
    poisoned = x.at[0, 0].set(jnp.nan)
    _, guarded = bnjax.batch_norm(poisoned, state, training=True)
    print(
        f"   a batch with a NaN leaves the state alone: mean={np.asarray(guarded.mean)} "
        f"skipped={int(guarded.skipped)}\n"
    )


def tour_stability() -> None:
    """Part 2: the two-pass variance against E[x^2]-E[x]^2 at |mean| = 1000 x std."""
    print("2) Variance when |mean| = 1000 x std (float32 input, float64 reference):")
    x = jax.random.normal(jax.random.key(0), (256, 8, 8, 4)) + 1000.0
    reference = np.asarray(x, np.float64).var(axis=(0, 1, 2))
    _, state = bnjax.batch_norm(x, bnjax.batch_norm_state(4), training=True, momentum=0.0)
    naive = np.mean(np.square(x), (0, 1, 2)) - np.square(np.mean(x, (0, 1, 2)))
    ours_error = np.max(np.abs(np.asarray(state.var) - reference) / reference)
    naive_error = np.max(np.abs(naive - reference) / reference)
    print(f"   relative error: bnjax {ours_error:.1e}   naive E[x^2]-E[x]^2 {naive_error:.1e}\n")


def tour_batch_composition(steps: int, batch: int, seed: int) -> None:
    """Part 3: the same MLP trained on shuffled and on one-class batches, evaluated."""
    print(f"3) Same MLP with BN, {steps} SGD steps of {batch}, two batch compositions")
    x, y = make_clusters(seed, per_class=1024)
    x_test, y_test = make_clusters(seed, per_class=256, draw=1)
    header = ("batches", "final loss", "acc (running stats)", "acc (batch stats)", "stat drift")
    print("   " + " | ".join(f"{h:>19}" for h in header))
    for clustered in (False, True):
        start = time.perf_counter()
        params, states, losses = train(x, y, clustered, steps, batch, seed)
        eval_logits, _ = mlp(params, states, x_test, training=False)
        batch_logits, _ = mlp(params, states, x_test, training=True)
        row = (
            "one class each" if clustered else "shuffled",
            f"{losses[-20:].mean():.3f}",
            f"{accuracy(eval_logits, y_test):.3f}",
            f"{accuracy(batch_logits, y_test):.3f}",
            f"{population_drift(params, states, x):.3f}",
        )
        print(
            "   "
            + " | ".join(f"{v:>19}" for v in row)
            + f"   ({time.perf_counter() - start:.1f} s)"
        )
    print(
        "\n   'acc (running stats)' is what serving sees; 'stat drift' is how far the first BN\n"
        "   layer's running mean/std sit from the population's, in population stds.\n"
        "   The full study (scripts/batch_study.py) measures this with seeds."
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the three parts: ``python -m bnjax.demo [--steps=300] [--batch_size=64] [--seed=0]``.

    argparse rather than absl: the demo is part of the library, which needs only jax, flax
    and numpy (absl comes with the training application, ``bnjax[train]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m bnjax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per condition")
    parser.add_argument("--batch_size", type=int, default=64, help="examples per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the init")
    options = parser.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(options, name) < 1:
            parser.error(f"--{name}={getattr(options, name)}: give a positive integer.")
    print(f"bnjax {bnjax.__version__} on {jax.default_backend()} ({jax.device_count()} device)\n")
    tour_functional_core()
    tour_stability()
    tour_batch_composition(options.steps, options.batch_size, options.seed)


if __name__ == "__main__":
    main()
