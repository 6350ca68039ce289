"""Synchronised batch norm under `jax.shard_map`: 8 devices, the statistics of the whole batch.

On a CPU the 8 devices are virtual (XLA_FLAGS below, set before jax is imported); on GPUs or
a TPU the same code spans the real devices. One per-device step passes `axis_name` to
`bnjax.batch_norm` and differentiates with `parallel.data_parallel_value_and_grad`;
`parallel.shard_map_step` runs it with the global batch split over the mesh. The script
checks that the running statistics and parameters after a few steps equal those of a single
device that sees the whole batch (`axis_name=None`).

Run: python examples/sync_bn_shard_map.py     (a few seconds on a CPU)
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bnjax  # noqa: E402
from bnjax import parallel  # noqa: E402

optimizer = optax.sgd(0.1, momentum=0.9)


def loss_fn(params, bn_state, batch, axis_name):
    h = batch["x"] @ params["w1"]
    h, bn_state = bnjax.batch_norm(
        h, bn_state, params["scale"], params["bias"], training=True, axis_name=axis_name
    )
    logits = jax.nn.relu(h) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), bn_state


def train_step(state, batch, axis_name):
    grad_fn = parallel.data_parallel_value_and_grad(loss_fn, axis_name, has_aux=True)
    (loss, bn_state), grads = grad_fn(state["params"], state["bn_state"], batch, axis_name)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "bn_state": bn_state}, {"loss": loss}


rng = np.random.default_rng(0)
params = {
    "w1": rng.normal(0, 0.3, (16, 32)).astype(np.float32),
    "scale": np.ones(32, np.float32),
    "bias": np.zeros(32, np.float32),
    "w2": rng.normal(0, 0.3, (32, 4)).astype(np.float32),
}
state = {
    "params": params,
    "opt_state": optimizer.init(params),
    "bn_state": bnjax.batch_norm_state(32),
}
batches = [  # global batches of 64: 8 examples per device, offsets and scales differ per feature
    {
        "x": (rng.normal(3.0, 2.0, (64, 16)) * np.arange(1, 17)).astype(np.float32),
        "y": rng.integers(0, 4, 64).astype(np.int32),
    }
    for _ in range(5)
]

mesh = parallel.data_mesh()  # every device, mesh axis "batch"
run = parallel.shard_map_step(train_step, mesh)
single = jax.jit(lambda state, batch: train_step(state, batch, None))  # one device, whole batch
synced, reference = parallel.replicate(state, mesh), state
for batch in batches:
    synced, metrics = run(synced, batch)
    reference, ref_metrics = single(reference, batch)
loss, ref_loss = float(metrics["loss"]), float(ref_metrics["loss"])
print(
    f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, 5 steps of 64 "
    f"({64 // jax.device_count()} per device), "
    f"loss sharded {loss:.6f} vs one device {ref_loss:.6f}"
)


def max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


bn, ref_bn = synced["bn_state"], reference["bn_state"]
print(
    f"BN running mean: max |diff| {max_diff(bn.mean, ref_bn.mean):.2e} "
    f"(values up to {np.max(np.abs(ref_bn.mean)):.1f})"
)
print(
    f"BN running var:  max |diff| {max_diff(bn.var, ref_bn.var):.2e} "
    f"(values up to {np.max(ref_bn.var):.1f}); count {bn.count} = {ref_bn.count}"
)
print(f"parameters:      max |diff| {max_diff(synced['params'], reference['params']):.2e}")
