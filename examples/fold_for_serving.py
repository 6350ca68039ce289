"""Folding batch norm into the convolutions before it, and exporting the model for serving.

Trains `bnjax.models.SmallCNN` for a few steps on the generated 'clusters' images, folds every
BN layer into the conv/dense that feeds it (`bnjax.lifecycle.fold_model`, pairs read from the
traced computation), prints the fold report, how far the folded logits are from the original
model's in evaluation mode and the accuracy of both, exports a verified StableHLO artifact
(`bnjax.export`), reloads it without the model code, and times (unasserted) the two jitted
forward passes.

Run: python examples/fold_for_serving.py     (a few seconds on a CPU)
"""

import os
import tempfile
import time

import jax
import numpy as np
import optax

from bnjax import data, export, lifecycle, models

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

# Pairs from the traced computation: any linen/nnx model, whatever its layer names.
folded = lifecycle.fold_model(model, variables, test_set.images[:2], train=False)
print(folded.plan.format())
images, labels = test_set.images, test_set.labels
original_fn = jax.jit(folded.evaluate)  # the unfolded model, batch norm in evaluation mode
folded_fn = jax.jit(folded)
original, served = np.asarray(original_fn(images)), np.asarray(folded_fn(images))
print(
    f"max |logits difference| folded vs original: {np.max(np.abs(served - original)):.2e} "
    f"(logits up to {np.max(np.abs(original)):.1f})"
)
for name, logits in (("original (eval mode)", original), ("folded", served)):
    print(f"test accuracy {name}: {np.mean(logits.argmax(-1) == labels):.4f}")


def count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# The bundled models also fold by name into params for the same model built with norm="none".
stored = count({k: variables[k] for k in ("params", "batch_stats")})
by_name = count(lifecycle.fold(variables))
print(f"stored values: original {stored} (params + batch_stats), folded {by_name}")

# A verified serving artifact: StableHLO (format="onnx" with pip install 'bnjax[export]').
out = os.path.join(tempfile.mkdtemp(), "small_cnn")
print(export.export(folded, images[:16], out))
artifact_logits = export.load(out)(images)  # no model code needed
print(f"artifact vs original: {np.max(np.abs(artifact_logits - original)):.2e}; wrote {out}")


def latency_ms(fn, rounds=10):
    fn(images).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(images).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


before, after = latency_ms(original_fn), latency_ms(folded_fn)
print(
    f"latency on {len(images)} images (median of 10, not a benchmark): original {before:.2f} ms, "
    f"folded {after:.2f} ms"
)
