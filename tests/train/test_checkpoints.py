"""Checkpointer: interval and keep-N, exact round trips, refusing unsafe states, corruption."""

import gc
import glob
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bnjax.train import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    UnsafeStateError,
)
from tests.train.checkpoint_worker import bits


class TrainState(NamedTuple):
    params: dict
    batch_stats: dict
    opt_state: tuple
    step: int
    key: jax.Array


def make_state(step: int) -> TrainState:
    rng = np.random.default_rng(step)
    return TrainState(
        params={
            "dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)},
            "half": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
            "host64": rng.standard_normal(3),  # numpy float64 stays float64
        },
        batch_stats={"bn": {"mean": jnp.full(4, step, jnp.float32), "var": jnp.ones(4)}},
        opt_state=(jnp.zeros(3, jnp.float16), np.int32(step)),
        step=step,
        key=jax.random.fold_in(jax.random.key(1), step),
    )


def test_interval_keep_n_and_force(tmp_path):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=3, async_save=False)
    saved = [step for step in range(11) if ckpt.save(step, make_state(step))]
    assert saved == [0, 3, 6, 9]
    assert ckpt.all_steps() == [6, 9] and ckpt.latest_step() == 9
    assert ckpt.save(10, make_state(10), force=True)
    assert ckpt.save(10, make_state(10), force=True) is False  # already saved
    assert ckpt.all_steps() == [9, 10]
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    ckpt.close()


def test_async_saves_then_wait(tmp_path):
    with Checkpointer(str(tmp_path), max_to_keep=None, async_save=True) as ckpt:
        for step in range(5):
            assert ckpt.save(step, make_state(step))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == list(range(5))
        assert not glob.glob(str(tmp_path / "*tmp*"))
        for step in range(5):
            assert bits(ckpt.restore(step, make_state(0))) == bits(make_state(step))


def test_exact_round_trip_of_dtypes_bits_and_keys(tmp_path):
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    state = {
        "f32": np.array([-0.0, tiny, np.finfo(np.float32).max, 1 / 3], np.float32),
        "bf16": jnp.array([1e-3, -7.5, 3e38], jnp.bfloat16),
        "f16": np.array([6e-8, -65504.0], np.float16),
        "f64": np.array([np.pi, 1e-310]),
        "ints": (np.int8(-128), np.uint8(255), np.int64(2**62), jnp.int32(-5)),
        "mask": np.array([True, False]),
        "threefry": jax.random.key(7),
        "rbg": jax.random.split(jax.random.key(3, impl="rbg"), 2),
        "raw_key": jax.random.PRNGKey(11),
        "python": (3, 0.1, True),
    }
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(0, state)
        step, restored = ckpt.restore_latest(state)
        _, raw = ckpt.restore_latest()  # no target: plain dicts, typed keys still typed
    assert step == 0 and bits(restored) == bits(state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for name in ("f32", "f16", "f64", "mask"):
        assert isinstance(restored[name], np.ndarray)
    assert isinstance(restored["bf16"], jax.Array)
    assert restored["python"] == (3, 0.1, True)
    assert jax.random.key_impl(restored["rbg"]) == jax.random.key_impl(state["rbg"])
    assert jax.random.key_impl(raw["threefry"]) == jax.random.key_impl(state["threefry"])
    assert np.array_equal(jax.random.key_data(raw["rbg"]), jax.random.key_data(state["rbg"]))


def test_abstract_target_and_sharding(tmp_path):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    state = {"w": jax.device_put(jnp.arange(16.0), sharding), "key": jax.random.key(0)}
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(4, state)
        step, restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
        _, resharded = ckpt.restore_latest(state)
    assert step == 4 and bits(restored) == bits(state)
    assert resharded["w"].sharding == sharding


def test_unsafe_states_are_refused_and_nothing_is_written(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(0, make_state(0))
    nan_kernel = make_state(1)
    nan_kernel.params["dense"]["kernel"] = (
        nan_kernel.params["dense"]["kernel"].at[0, 0].set(jnp.nan)
    )
    with pytest.raises(UnsafeStateError, match="step 1: params/dense/kernel \\(non-finite\\)"):
        ckpt.save(1, nan_kernel)
    inf_opt = make_state(2)._replace(opt_state=(jnp.full(3, jnp.inf, jnp.float16), np.int32(2)))
    with pytest.raises(UnsafeStateError, match="opt_state/0"):
        ckpt.save(2, inf_opt, force=True)
    negative = make_state(3)._replace(
        batch_stats={"bn": {"mean": jnp.zeros(4), "var": -jnp.ones(4)}}
    )
    with pytest.raises(UnsafeStateError, match="negative var"):
        ckpt.save(3, negative)
    assert ckpt.all_steps() == [0] and sorted(os.listdir(tmp_path)) == ["0"]
    step, restored = ckpt.restore_latest(make_state(0))
    assert step == 0 and bits(restored) == bits(make_state(0))
    ckpt.close()


def _truncate_largest(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/**", recursive=True) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)


def _overwrite_data(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:  # same size, different bytes: orbax alone misses it
        file.seek(os.path.getsize(largest) // 2)
        file.write(b"\x00\x01" * 8)


def _delete_metadata(step_dir):
    os.remove(f"{step_dir}/state/_METADATA")


def _garble_manifest(step_dir):
    with open(f"{step_dir}/manifest/metadata", "w") as file:
        file.write('{"format": "bnjax.chec')


# orbax leaves coroutines behind when a restore fails; they are reported when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncate_largest, "OUT_OF_RANGE"),
        (_overwrite_data, "'params/w' fails its checksum"),  # only our checksum sees it
        (_delete_metadata, "_METADATA"),
        (_garble_manifest, "JSONDecodeError"),
    ],
)
def test_corrupt_latest_falls_back_with_a_warning(tmp_path, corrupt, reason):
    state = lambda step: make_state(step)._replace(  # noqa: E731
        params={"w": np.arange(4096, dtype=np.float32) + step}
    )
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    for step in range(3):
        ckpt.save(step, state(step))
    ckpt.close()
    corrupt(str(tmp_path / "2"))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.warns(CheckpointWarning, match="checkpoint step 2 .* unusable") as caught:
        step, restored = ckpt.restore_latest(state(0))
    assert reason in str(caught[0].message) and "moved to" in str(caught[0].message)
    assert step == 1 and bits(restored) == bits(state(1))
    assert [p.name.split(".")[0] for p in (tmp_path / "corrupt").iterdir()] == ["2"]
    assert ckpt.save(2, state(2))  # the resumed run saves step 2 again
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        step, restored = ckpt.restore_latest(state(0))
    assert step == 2 and bits(restored) == bits(state(2))
    ckpt.close()
    gc.collect()


def test_all_corrupt_gives_none(tmp_path):
    with Checkpointer(str(tmp_path), quarantine=False) as ckpt:
        ckpt.save(0, make_state(0))
        ckpt.wait_until_finished()
        _delete_metadata(str(tmp_path / "0"))
        with pytest.warns(CheckpointWarning, match="step 0"):
            assert ckpt.restore_latest(make_state(0)) is None
        assert ckpt.all_steps() == [0]  # not moved


def test_a_different_model_is_an_error_not_corruption(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(0, {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})
        target = {"w": np.zeros(4, np.float32), "c": np.zeros(2, np.float32)}
        with pytest.raises(CheckpointMismatchError, match=r"w: saved \(3,\) float32, target \(4,"):
            ckpt.restore_latest(target)
        assert ckpt.all_steps() == [0]


def test_unfinished_tmp_directories_are_removed_on_open(tmp_path):
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(0, make_state(0))
    leftover = tmp_path / "1.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    with Checkpointer(str(tmp_path)) as ckpt:
        assert not leftover.exists()
        assert ckpt.restore_latest(make_state(0))[0] == 0
        assert ckpt.save(1, make_state(1))


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="save_interval_steps"):
        Checkpointer(str(tmp_path), save_interval_steps=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(str(tmp_path), max_to_keep=0)
