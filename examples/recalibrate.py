"""Recalibrating batch norm's running statistics after training on non-i.i.d. batches.

Trains `bnjax.models.SmallCNN` on the generated 'clusters' images with a class-skewed sampler
(most of every batch is one class), so the running statistics, an average of skewed batch
statistics, are not the statistics of the data. Prints held-out accuracy in evaluation mode
(running statistics) and with uniform batches' own statistics, then replaces the running
statistics with exact population statistics over uniformly drawn training batches
(`bnjax.lifecycle.recalibrate`) and prints the accuracy again. Whatever happens is printed as
measured: recalibration fixes the statistics, not what the network learned from skewed batches.

Run: python examples/recalibrate.py     (a few seconds on a CPU)
"""

import jax
import numpy as np
import optax

from bnjax import data, lifecycle, models

# Share of each batch drawn from one class. (With SKEW = 1, one class per batch, this network
# learns nothing in 150 steps: accuracy stays near chance, 0.12, before and after recalibration.)
SKEW = 0.9

train_set, test_set = data.load("clusters", "train"), data.load("clusters", "test")
sampler = data.make_sampler("skewed", train_set.groups("class"), batch_size=64, skew=SKEW, seed=0)
model = models.SmallCNN(features=(8, 16), norm_options={"momentum": 0.9})
variables = jax.jit(model.init, static_argnames="train")(
    jax.random.key(0), train_set.images[:2], train=False
)
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


for step, batch in enumerate(data.batches(train_set, sampler, num_epochs=None)):
    if step == 150:
        break
    variables, opt_state, loss = train_step(variables, opt_state, batch["image"], batch["label"])
print(f"trained 150 steps of 64 with skew={SKEW} batches, last loss {float(loss):.3f}")

eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
batch_stats_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])


def accuracy(fn, v):  # held-out accuracy over uniform test batches of 250
    images, labels = test_set.images.reshape(8, 250, 16, 16, 3), test_set.labels.reshape(8, 250)
    return float(
        np.mean([np.mean(fn(v, x).argmax(-1) == y) for x, y in zip(images, labels, strict=True)])
    )


def show(title, v):
    print(
        f"{title:<28} running stats (eval) {accuracy(eval_fn, v):.4f} | "
        f"uniform batch stats {accuracy(batch_stats_fn, v):.4f}"
    )


show("before recalibration:", variables)
uniform = data.make_sampler("uniform", len(train_set), batch_size=64, seed=1)
batches = (b["image"] for b in data.batches(train_set, uniform))
recalibrated = lifecycle.recalibrate(
    model, variables, batches, num_batches=50, apply_kwargs={"train": False}
)
show("after recalibrate (50x64):", recalibrated)
before, after = variables["batch_stats"]["norm1"], recalibrated["batch_stats"]["norm1"]
print(
    f"norm1 running mean moved by up to {np.max(np.abs(after['mean'] - before['mean'])):.3f}, "
    f"var ratio new/old in [{np.min(after['var'] / before['var']):.2f}, "
    f"{np.max(after['var'] / before['var']):.2f}]"
)
