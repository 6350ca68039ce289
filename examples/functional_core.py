"""Pure JAX with bnjax's functional core: parameters and batch-norm state as explicit values.

Shows a jitted training step that threads a `bnjax.BatchNormState` through like any other
value, evaluation with `training=False` (running statistics), the momentum convention
(PyTorch's momentum=0.1 is bnjax's 0.9) and the non-finite guard (`state.skipped`).

Run: python examples/functional_core.py     (a few seconds on a CPU)
"""

import jax
import jax.numpy as jnp
import optax

import bnjax

# Two classes of 16-d points whose features have very different offsets and scales.
key_x, key_w1, key_w2 = jax.random.split(jax.random.key(0), 3)
labels = jnp.arange(1024) % 2
spread = jnp.linspace(0.5, 20.0, 16)
x = (jax.random.normal(key_x, (1024, 16)) + labels[:, None] * 1.5) * spread + 50.0
params = {
    "w1": jax.random.normal(key_w1, (16, 32)) / 4.0,
    "scale": jnp.ones(32),
    "bias": jnp.zeros(32),
    "w2": jax.random.normal(key_w2, (32, 2)) / 6.0,
}
bn_state = bnjax.batch_norm_state(32)  # BatchNormState(mean, var, count, skipped)


def forward(params, bn_state, x, training):
    h = x @ params["w1"]
    h, bn_state = bnjax.batch_norm(
        h, bn_state, params["scale"], params["bias"], training=training, momentum=0.9
    )
    return jax.nn.relu(h) @ params["w2"], bn_state


def loss_fn(params, bn_state, x, y):
    logits, bn_state = forward(params, bn_state, x, training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), bn_state


optimizer = optax.adam(1e-2)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, bn_state, x, y):
    (loss, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, bn_state, loss


for step in range(60):
    rows = slice((step % 16) * 64, (step % 16 + 1) * 64)
    params, opt_state, bn_state, loss = train_step(
        params, opt_state, bn_state, x[rows], labels[rows]
    )
print(f"trained 60 steps: loss {float(loss):.4f}, bn_state.count={int(bn_state.count)}")

logits, unchanged = forward(params, bn_state, x, training=False)  # running statistics
accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
print(
    f"evaluation (training=False): accuracy {accuracy:.3f}, state returned as is: "
    f"{unchanged is bn_state}"
)

# Momentum: running = momentum * running + (1 - momentum) * batch. PyTorch's momentum=0.1
# is the weight of the batch, so nn.BatchNorm1d(C, momentum=0.1) is bnjax momentum=0.9.
h = x[:64] @ params["w1"]
_, new = bnjax.batch_norm(h, bn_state, training=True, momentum=0.9)
torch_rule = 0.9 * bn_state.mean + 0.1 * h.mean(0)  # PyTorch: (1 - 0.1) * old + 0.1 * batch
# (Relative to the means' size: at |h| ~ 300 one float32 rounding step is ~3e-5.)
relative = jnp.max(jnp.abs(new.mean - torch_rule)) / jnp.max(jnp.abs(torch_rule))
print(f"momentum: bnjax 0.9 vs PyTorch 0.1 rule, max relative diff of running mean {relative:.1e}")

# Non-finite guard: a batch with a NaN leaves the running statistics alone and is counted.
# (Its gradients are NaN too: a real loop also skips that optimizer update, as done here.)
bad = x[:64].at[3, 5].set(jnp.nan)
_, _, guarded, loss = train_step(params, opt_state, bn_state, bad, labels[:64])
print(
    f"NaN batch: loss {float(loss)}, running mean unchanged: "
    f"{bool(jnp.array_equal(guarded.mean, bn_state.mean))}, "
    f"skipped={int(guarded.skipped)}, count={int(guarded.count)}"
)
