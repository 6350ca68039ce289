"""Every parallel mode trains the same network to the same state (bnjax.parallel).

A full training step (forward, loss, gradients, SGD with momentum, batch-norm state update) of
the small conv net in tests/parallel_model.py, run for a few steps on 8 CPU devices (conftest),
must give the parameters, optimizer state and running statistics of one device on the whole
batch (synchronised mode), or of one device with ghost batches of the per-device size (local
mode, sub-groups). Two real processes on 127.0.0.1 must match one process with 4 devices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bnjax import parallel
from tests import multihost
from tests import parallel_model as model

DEVICES = 8
PER_DEVICE = 4
BATCH = DEVICES * PER_DEVICE
STEPS = 3
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
BATCHES = model.batches(STEPS, BATCH)


def one_device(**step_options):
    """The reference: one device, the whole batch, plain jit."""
    step = jax.jit(lambda state, batch: model.make_step(**step_options)(state, batch, None))
    return train(step, model.init_state())


def train(run, state, place=lambda batch: batch):
    losses = []
    for batch in BATCHES:
        state, metrics = run(state, place(batch))
        losses.append(metrics["loss"])
    return state, np.asarray(losses)


def run_mode(mode: str, mesh=None, per_device=False, **step_options):
    """Trains in `mode` ("pmap", "shard_map", "jit") on all 8 devices (or `mesh`)."""
    step = model.make_step(**step_options)
    state = model.init_state()
    if per_device:  # local statistics: one batch-norm state per device
        state["bn_state"] = parallel.stack_copies(state["bn_state"], DEVICES)
        per_device = {"params": False, "opt_state": False, "bn_state": True}
    if mode == "pmap":
        return train(parallel.pmap_step(step, per_device=per_device), state)
    mesh = mesh or parallel.data_mesh()
    if mode == "shard_map":  # host batches: the wrapper splits them
        return train(parallel.shard_map_step(step, mesh, per_device=per_device), state)
    run = parallel.jit_sharded_step(step, mesh)  # placed ahead of time, as many hosts need
    return train(run, parallel.replicate(state, mesh), lambda b: parallel.shard_batch(b, mesh))


def device_average(bn_state):
    """The average over devices of per-device batch-norm states (leading axis = devices)."""
    for layer in bn_state.values():
        assert np.all(layer.count == layer.count[0])
    return {
        name: layer._replace(
            mean=layer.mean.mean(0),
            var=layer.var.mean(0),
            count=layer.count[0],
            skipped=layer.skipped[0],
        )
        for name, layer in bn_state.items()
    }


@pytest.fixture(scope="module")
def synchronised_reference():
    return one_device()


@pytest.fixture(scope="module")
def local_reference():
    return one_device(ghost_batch_size=PER_DEVICE)


@pytest.fixture(scope="module")
def group_reference():
    return one_device(ghost_batch_size=BATCH // 2)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "jit"])
def test_synchronised_training_equals_one_device(mode, synchronised_reference):
    state, losses = run_mode(mode)
    reference_state, reference_losses = synchronised_reference
    chex.assert_trees_all_close(state, reference_state, **TOLERANCE)
    chex.assert_trees_all_close(losses, reference_losses, **TOLERANCE)
    assert int(state["bn_state"]["bn1"].count) == STEPS


def test_local_mode_under_jit_is_ghost_batches(local_reference, synchronised_reference):
    state, losses = run_mode("jit", ghost_batch_size=PER_DEVICE)
    chex.assert_trees_all_close((state, losses), local_reference, **TOLERANCE)
    synchronised_state, _ = synchronised_reference  # local statistics really are different
    assert not np.allclose(state["bn_state"]["bn0"].var, synchronised_state["bn_state"]["bn0"].var)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_local_mode_without_axis_name_keeps_per_device_state(mode, local_reference):
    # No traffic for the statistics; gradients are still averaged. The running statistics are
    # linear in the batch statistics, so their device average equals ghost-batch training.
    state, losses = run_mode(mode, per_device=True, sync=False)
    reference_state, reference_losses = local_reference
    chex.assert_trees_all_close(state["params"], reference_state["params"], **TOLERANCE)
    chex.assert_trees_all_close(state["opt_state"], reference_state["opt_state"], **TOLERANCE)
    chex.assert_trees_all_close(
        device_average(state["bn_state"]), reference_state["bn_state"], **TOLERANCE
    )
    chex.assert_trees_all_close(losses, reference_losses, **TOLERANCE)


@pytest.fixture(scope="module")
def independent_devices():
    """Batch-norm states after one step of 8 single-device models, each on its own rows."""
    initial = model.init_state()
    forward = jax.jit(model.forward)
    states = [
        forward(initial["params"], initial["bn_state"], chunk)[1]
        for chunk in np.split(BATCHES[0]["image"], DEVICES)
    ]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *states)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "jit"])
def test_local_statistics_equal_independent_devices(mode, independent_devices):
    initial = model.init_state()
    batch = BATCHES[0]
    if mode == "jit":  # ghost batches: one state, the average of the devices' states
        step = model.make_step(ghost_batch_size=PER_DEVICE)
        state, _ = parallel.jit_sharded_step(step, parallel.data_mesh())(initial, batch)
        expected = device_average(independent_devices)
    else:
        step = model.make_step(sync=False)
        state = dict(initial, bn_state=parallel.stack_copies(initial["bn_state"], DEVICES))
        per_device = {"params": False, "opt_state": False, "bn_state": True}
        if mode == "pmap":
            run = parallel.pmap_step(step, per_device=per_device)
        else:
            run = parallel.shard_map_step(step, parallel.data_mesh(), per_device=per_device)
        state, _ = run(state, batch)
        expected = independent_devices
    chex.assert_trees_all_close(state["bn_state"], expected, **TOLERANCE)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_ghost_batches_with_axis_name_sync_only_the_running_average(mode, local_reference):
    state, losses = run_mode(mode, ghost_batch_size=PER_DEVICE)
    chex.assert_trees_all_close((state, losses), local_reference, **TOLERANCE)


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "jit"])
def test_sub_group_sync_equals_independent_groups(mode, group_reference):
    # Two groups of 4 devices share statistics within the group; gradients are averaged over
    # all 8. One device with ghost batches of a group's 16 examples computes the same.
    group = DEVICES // 2
    reference_state, reference_losses = group_reference
    mesh = parallel.data_mesh(sync_group_size=group)
    if mode == "pmap":
        groups = parallel.sync_groups(DEVICES, group)
        state, losses = run_mode(mode, per_device=True, axis_index_groups=groups)
    elif mode == "shard_map":  # a 2-D mesh (replica, batch): statistics over "batch" only
        state, losses = run_mode(mode, mesh, per_device=True, sync="batch")
    else:
        state, losses = run_mode(mode, mesh, ghost_batch_size=group * PER_DEVICE)
    chex.assert_trees_all_close(losses, reference_losses, **TOLERANCE)
    chex.assert_trees_all_close(state["params"], reference_state["params"], **TOLERANCE)
    bn_state = state["bn_state"]
    if mode != "jit":
        for device in range(DEVICES):  # identical within a group, different across groups
            same = device - device % group
            chex.assert_trees_all_equal(
                *(jax.tree.map(lambda leaf, d=d: leaf[d], bn_state) for d in (device, same))
            )
        assert not np.allclose(bn_state["bn0"].mean[0], bn_state["bn0"].mean[group])
        bn_state = device_average(bn_state)
    chex.assert_trees_all_close(bn_state, reference_state["bn_state"], **TOLERANCE)


def test_process_local_batches_build_the_global_batch():
    mesh = parallel.data_mesh()
    batch = BATCHES[0]
    assert parallel.local_rows(mesh, BATCH) == slice(0, BATCH)  # one process holds every row
    assert parallel.process_rows(BATCH, 0, 1) == parallel.local_rows(mesh, BATCH)
    global_batch = parallel.local_batch_to_global(batch, mesh)
    chex.assert_trees_all_equal(parallel.to_host(global_batch), batch)
    assert global_batch["image"].sharding == parallel.shard_batch(batch, mesh)["image"].sharding
    assert global_batch["image"].addressable_shards[3].data.shape == (PER_DEVICE, *model.IMAGE)


def test_bad_arguments_are_named():
    mesh = parallel.data_mesh()
    with pytest.raises(ValueError, match=r"`batch\['image'\]` has shape \(30, 6, 6, 3\)"):
        parallel.shard_batch({"image": np.zeros((30, *model.IMAGE), np.float32)}, mesh)
    with pytest.raises(ValueError, match="local devices"):
        parallel.pmap_step(model.make_step())(model.init_state(), {"image": np.zeros((12, 2))})
    with pytest.raises(ValueError, match="`sync_group_size`=3"):
        parallel.data_mesh(sync_group_size=3)
    with pytest.raises(ValueError, match="`num_devices`=9"):
        parallel.data_mesh(9)
    with pytest.raises(ValueError, match="`reduce`"):
        parallel.data_parallel_value_and_grad(sum, "batch", reduce="max")


def test_initialize_distributed_reads_the_environment(monkeypatch):
    for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert parallel.initialize_distributed() is False  # nothing set: one process, no-op
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert parallel.initialize_distributed("10.0.0.1:1234") is False  # one process: no-op
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs coordinator_address, process_id"):
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match=r"`process_id` \(or \$JAX_PROCESS_ID\)"):
        parallel.initialize_distributed("10.0.0.1:1234")


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_summed_losses_for_unequal_shards(mode):
    # reduce="sum": each device divides its loss by the global count, so devices may hold
    # different numbers of valid examples (here 0 to 7 of 7) and the gradient stays exact.
    values = np.linspace(-1.0, 2.0, DEVICES * 7, dtype=np.float32)
    valid = np.arange(DEVICES * 7) % 7 < np.repeat(np.arange(DEVICES), 7)
    weight = np.float32(1.5)

    def loss(w, x, m):
        return jax.numpy.sum(jax.numpy.where(m, (w * x - 1.0) ** 2, 0.0)) / valid.sum()

    expected = jax.value_and_grad(loss)(weight, values, valid)

    def step(w, batch, axis_name):
        grad_fn = parallel.data_parallel_value_and_grad(loss, axis_name, reduce="sum")
        value, grad = grad_fn(w, batch["x"], batch["m"])
        return w, (value, grad)

    batch = {"x": values, "m": valid}
    if mode == "pmap":
        _, got = parallel.pmap_step(step)(weight, batch)
    else:
        _, got = parallel.shard_map_step(step, parallel.data_mesh())(weight, batch)
    chex.assert_trees_all_close(got, expected, **TOLERANCE)


def test_distributed_flags_feed_initialize(monkeypatch):
    from absl import flags

    flag_values = flags.FlagValues()
    parallel.define_distributed_flags(flag_values)
    flag_values(["train", "--num_processes=1", "--coordinator_address=10.0.0.1:1234"])
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert not parallel.initialize_distributed(
        flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
    )


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    multihost.skip_if_disabled()
    worker = Path(__file__).with_name("multihost_worker.py")
    multihost.run([sys.executable, str(worker), str(tmp_path), str(STEPS)], tmp_path, timeout=50)

    # The same steps in this process on 4 of its 8 devices, fed the whole global batch.
    mesh = parallel.data_mesh(4)
    run = parallel.jit_sharded_step(model.make_step(), mesh)
    state = parallel.replicate(model.init_state(), mesh)
    for batch in model.batches(STEPS, 4 * PER_DEVICE):
        state, metrics = run(state, parallel.shard_batch(batch, mesh))
    expected = model.flatten(parallel.to_host(state))
    expected["/loss"] = np.asarray(metrics["loss"])
    for process_id in range(2):
        with np.load(tmp_path / f"process{process_id}.npz") as saved:
            for mode in ("jit", "shard_map", "pmap"):
                got = {key: saved[mode + key] for key in expected}
                chex.assert_trees_all_close(got, expected, **TOLERANCE)


def test_pmap_step_refuses_states_that_differ_across_devices():
    """A batch norm without `axis_name` under pmap gives each device its own statistics; the
    first call must say so instead of silently keeping device 0's copy (shard_map refuses at
    trace time)."""
    import bnjax

    def forgot_axis_name(state, x, axis_name):
        del axis_name
        _, state = bnjax.batch_norm(x, state, training=True)
        return state, {"mean": state.mean}

    def synchronised(state, x, axis_name):
        _, state = bnjax.batch_norm(x, state, training=True, axis_name=axis_name)
        return state, {"mean": state.mean}

    x = jax.random.normal(jax.random.key(0), (8 * jax.local_device_count(), 3))
    with pytest.raises(ValueError, match=r"differ across devices at \['.mean', '.var'\]"):
        parallel.pmap_step(forgot_axis_name)(bnjax.batch_norm_state(3), x)
    run = parallel.pmap_step(synchronised)
    state = bnjax.batch_norm_state(3)
    for _ in range(2):  # the checked first call, then the unchecked fast path
        state, metrics = run(state, x)
        assert state.mean.shape == (3,) and metrics["mean"].shape == (3,)
    _, whole = bnjax.batch_norm(x, bnjax.batch_norm_state(3), training=True)
    _, whole = bnjax.batch_norm(x, whole, training=True)
    np.testing.assert_allclose(state.var, whole.var, rtol=1e-5)


def test_shard_map_step_names_each_varying_output_and_the_axes_it_varies_over():
    """Statistics synced within groups of 4 only (axis "batch" of a (replica, batch) mesh)
    still differ between the groups: the error names each such leaf, metrics included, and
    the axis, from the values' traced types; a metric that is the same everywhere is not
    named."""
    import bnjax

    def synced_within_groups(state, x, axis_name):
        _, state = bnjax.batch_norm(x, state, training=True, axis_name="batch")
        return state, {"mean": state.mean, "constant": jax.numpy.zeros(())}

    mesh = parallel.data_mesh(sync_group_size=DEVICES // 2)
    run = parallel.shard_map_step(synced_within_groups, mesh)
    x = jax.random.normal(jax.random.key(0), (BATCH, 3))
    with pytest.raises(ValueError, match=r"the step returned state\.mean") as error:
        run(bnjax.batch_norm_state(3), x)
    message = str(error.value)
    assert "state.mean (over 'replica'), state.var (over 'replica')" in message
    assert "metrics['mean'] (over 'replica')" in message
    assert "constant" not in message and "('replica', 'batch')" in message
    # Per-device state may vary (each device starts from its own copy): only the metric that
    # comes from it is named, and it now varies over both axes.
    run = parallel.shard_map_step(synced_within_groups, mesh, per_device=True)
    with pytest.raises(
        ValueError, match=r"returned metrics\['mean'\] \(over 'replica', 'batch'\) that"
    ):
        run(parallel.stack_copies(bnjax.batch_norm_state(3), DEVICES), x)


def test_shard_map_step_lets_other_errors_through_unchanged():
    """Only outputs found varying are reworded; an error raised inside the step, even one
    that mentions check_vma, comes out as it was raised."""

    own_error = ValueError("the step's own error, not about check_vma's outputs")

    def failing_step(state, x, axis_name):
        raise own_error

    run = parallel.shard_map_step(failing_step, parallel.data_mesh())
    with pytest.raises(ValueError) as error:
        run({"w": np.zeros(3, np.float32)}, np.zeros((BATCH, 3), np.float32))
    assert error.value is own_error


# --------------------------------------------------------------------------------------------
# Modules whose variables are closed over inside jax.shard_map (constants, not arguments).


def _sharded_rows():
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    x = jax.random.normal(jax.random.key(3), (BATCH, 3)) * 2.0 + 1.0
    return mesh, x, jax.device_put(x, jax.sharding.NamedSharding(mesh, P("batch")))


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_closed_over_linen_variables_work_inside_shard_map(training):
    from bnjax import linen as bnn

    mesh, x, rows = _sharded_rows()
    bn = bnn.BatchNorm(use_running_average=not training, axis_name="batch")
    variables = bn.init(jax.random.key(0), x)

    def step(rows):
        return bn.apply(variables, rows, mutable=["batch_stats"])

    run = jax.shard_map(step, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P()))
    y, updates = run(rows)
    expected = bnn.BatchNorm(use_running_average=not training).apply(
        variables, x, mutable=["batch_stats"]
    )
    chex.assert_trees_all_close((y, updates), expected, **TOLERANCE)


def test_closed_over_nnx_module_inside_shard_map():
    """Evaluation reads a closed-over module; training would mutate it from inside the
    transform, which flax refuses with its own error (pass the module to nnx.shard_map)."""
    from flax import nnx
    from flax.errors import TraceContextError

    from bnjax import nnx as bnx

    mesh, x, rows = _sharded_rows()
    layer = bnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
    layer.var[...] = layer.var[...] * 4.0
    layer.eval()
    run = jax.shard_map(
        lambda rows: layer(rows), mesh=mesh, in_specs=P("batch"), out_specs=P("batch")
    )
    chex.assert_trees_all_close(run(rows), layer(x), **TOLERANCE)
    layer.train()
    with pytest.raises(TraceContextError, match="Cannot mutate BatchStat"):
        run(rows)
    passed = nnx.shard_map(
        lambda layer, rows: layer(rows),
        mesh=mesh,
        in_specs=(P(), P("batch")),
        out_specs=P("batch"),
    )
    reference = bnx.BatchNorm(3, rngs=nnx.Rngs(0))
    reference.var[...] = reference.var[...] * 4.0
    chex.assert_trees_all_close(passed(layer, rows), reference(x), **TOLERANCE)
    chex.assert_trees_all_close(layer.mean[...], reference.mean[...], **TOLERANCE)
