"""Swapping flax.linen's norm layers for bnjax's in an existing linen model: one import.

The CNN below is ordinary flax.linen code. `norms` is the namespace its norm layers come from:
`flax.linen` as written, or `bnjax.linen` after the swap (`from bnjax import linen as bnn`).
Both are trained from the same initial variables on the same batches; the script prints how
far their logits and running statistics end up apart, and loads a flax checkpoint (msgpack
bytes) into the bnjax model's variable tree.

Run: python examples/flax_linen_swap.py     (a few seconds on a CPU)
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import linen as bnn  # the swap: was `nn.BatchNorm`, `nn.LayerNorm`, ...


class CNN(nn.Module):
    norms: Any = nn  # where BatchNorm / LayerNorm come from: flax.linen or bnjax.linen

    @nn.compact
    def __call__(self, x, train: bool):
        for width in (8, 16):
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            x = self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = self.norms.LayerNorm()(x.mean(axis=(1, 2)))
        return nn.Dense(10)(x)


rng = np.random.default_rng(0)
images = jnp.asarray(rng.normal(1.0, 3.0, (8, 32, 8, 8, 3)), jnp.float32)  # 8 batches of 32
labels = jnp.asarray(rng.integers(0, 10, (8, 32)))
flax_model, bnjax_model = CNN(norms=nn), CNN(norms=bnn)
init = jax.jit(flax_model.init, static_argnames="train")
init_vars = init(jax.random.key(2), images[0], train=False)  # one initialization for both
tx = optax.sgd(0.1, momentum=0.9)


def train(model, variables):
    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # batch_stats: aux, not grad
        (loss, batch_stats), grads = grad_fn(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for x, y in zip(images, labels, strict=True):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
    return {"params": params, "batch_stats": batch_stats}, float(loss)


def max_diff(a, b):  # over all leaves of two pytrees of the same structure
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


flax_vars, flax_loss = train(flax_model, init_vars)
bnjax_vars, bnjax_loss = train(bnjax_model, init_vars)
print(f"after 8 SGD steps: loss flax {flax_loss:.6f}  bnjax {bnjax_loss:.6f}")
for name in ("batch_stats", "params"):
    print(f"max |diff| {name}: {max_diff(flax_vars[name], bnjax_vars[name]):.2e}")
flax_apply = jax.jit(flax_model.apply, static_argnames="train")
bnjax_apply = jax.jit(bnjax_model.apply, static_argnames="train")
logits_flax = flax_apply(flax_vars, images[0], train=False)
logits_bnjax = bnjax_apply(bnjax_vars, images[0], train=False)
print(f"max |diff| eval logits: {max_diff(logits_flax, logits_bnjax):.2e}")

# A flax checkpoint restores into the bnjax model's variable tree (the very same tree), and
# serves unchanged.
checkpoint = flax.serialization.to_bytes(flax_vars)
template = jax.eval_shape(lambda: bnjax_model.init(jax.random.key(3), images[0], train=False))
restored = flax.serialization.from_bytes(template, checkpoint)
same_tree = jax.tree.structure(template) == jax.tree.structure(flax_vars)
logits_restored = bnjax_apply(restored, images[0], train=False)
print(
    f"flax checkpoint -> bnjax model: same variable tree {same_tree}, max |diff| logits "
    f"{max_diff(logits_restored, logits_flax):.2e}"
)
