"""Folding batch norm into the convolutions before it, for serving.

Trains `bnjax.models.SmallCNN` for a few steps on the generated 'clusters' images, folds every
BN layer into its conv/dense (`bnjax.lifecycle.fold`), and serves the folded weights with the
same architecture built with norm='none'. Prints how far the folded logits are from the
original model's in evaluation mode, the accuracy of both, the number of stored values, and a
quick (unasserted) latency comparison of the two jitted forward passes.

Run: python examples/fold_for_serving.py     (a few seconds on a CPU)
"""

import time

import jax
import numpy as np
import optax

from bnjax import data, lifecycle, models

train_set, test_set = data.load("clusters", "train"), data.load("clusters", "test")
sampler = data.make_sampler("uniform", len(train_set), batch_size=64, seed=0)
model = models.SmallCNN(features=(8, 16), norm_options={"momentum": 0.9})
init = jax.jit(model.init, static_argnames="train")
variables = init(jax.random.key(0), train_set.images[:2], train=False)
tx = optax.adam(1e-2)
opt_state = tx.init(variables["params"])


@jax.jit
def train_step(variables, opt_state, images, labels):
    def loss_fn(params):
        logits, updates = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    param_updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], param_updates)
    return {**variables, **updates, "params": params}, opt_state, loss


for step, batch in enumerate(data.batches(train_set, sampler)):
    if step == 80:
        break
    variables, opt_state, loss = train_step(variables, opt_state, batch["image"], batch["label"])
print(f"trained SmallCNN 80 steps of 64, loss {float(loss):.3f}")

folded = lifecycle.fold(variables)  # {"params": ...}: BN folded into conv0, conv1
serving = models.SmallCNN(features=(8, 16), norm="none")
images, labels = test_set.images, test_set.labels
original_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
folded_fn = jax.jit(lambda v, x: serving.apply(v, x, train=False))
original, served = np.asarray(original_fn(variables, images)), np.asarray(folded_fn(folded, images))
print(
    f"max |logits difference| folded vs original: {np.max(np.abs(served - original)):.2e} "
    f"(logits up to {np.max(np.abs(original)):.1f})"
)
for name, logits in (("original (eval mode)", original), ("folded", served)):
    print(f"test accuracy {name}: {np.mean(logits.argmax(-1) == labels):.4f}")


def count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


stored = count({k: variables[k] for k in ("params", "batch_stats")})
print(f"stored values: original {stored} (params + batch_stats), folded {count(folded)}")


def latency_ms(fn, v, rounds=10):
    fn(v, images).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(v, images).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


before, after = latency_ms(original_fn, variables), latency_ms(folded_fn, folded)
print(
    f"latency on {len(images)} images (median of 10, not a benchmark): original {before:.2f} ms, "
    f"folded {after:.2f} ms"
)
