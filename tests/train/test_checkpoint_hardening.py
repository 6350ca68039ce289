"""Checkpointer hardening: a quiet fallback, corrupt steps replaced on save, `verify`, read-only."""

import asyncio
import gc
import glob
import json
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax.checkpoints import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWarning,
    CorruptCheckpointError,
)
from tests.train.checkpoint_worker import bits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state(step: int) -> dict:
    return {
        "params": {"w": np.arange(4096, dtype=np.float32) + step},
        "batch_stats": {
            "bn": {"mean": np.full(2, step, np.float32), "var": np.ones(2, np.float32)}
        },
    }


def flip_bytes(step_dir) -> None:
    """Same size, different bytes in the largest array file: only the checksum sees it."""
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.seek(os.path.getsize(largest) // 2)
        file.write(b"\x00\x01" * 8)


def saved(directory, steps=(0, 1, 2)) -> None:
    with Checkpointer(str(directory), async_save=False) as checkpointer:
        for step in steps:
            checkpointer.save(step, state(step))


# Two corrupt steps, read into jax arrays (a real training target): orbax logs errors and
# leaves failed asyncio tasks behind ("Task exception was never retrieved" + a traceback).
FALLBACK = textwrap.dedent("""
    import glob, os, sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import logging
    from bnjax.train import Checkpointer

    logging.use_absl_handler()             # as under absl.app: orbax's logs reach stderr
    logging.set_verbosity(logging.WARNING)
    directory = sys.argv[1]
    make = lambda step: {
        "w": np.arange(4096, dtype=np.float32) + step,
        "batch_stats": {"bn": {"mean": np.full(2, step, np.float32),
                               "var": np.ones(2, np.float32)}},
    }
    with Checkpointer(directory, async_save=False) as checkpointer:
        for step in range(3):
            checkpointer.save(step, make(step))
    os.remove(f"{directory}/2/state/manifest.ocdbt")
    files = [f for f in glob.glob(f"{directory}/1/**", recursive=True) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)
    print("restoring", file=sys.stderr, flush=True)
    checkpointer = Checkpointer(directory)
    step, restored = checkpointer.restore_latest(jax.tree.map(jnp.asarray, make(0)))
    checkpointer.close()
    print("restored", step)
""")


def test_fallback_prints_one_warning_per_skipped_step(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0 and "restored 0" in result.stdout, result.stderr[-3000:]
    stderr = result.stderr.split("restoring\n", 1)[1]
    warned = [line for line in stderr.splitlines() if "CheckpointWarning" in line]
    assert len(warned) == 2, stderr
    assert "step 2 " in warned[0] and "step 1 " in warned[1]
    # One line per warning (run with -c, python shows no source line), and nothing else.
    assert [line for line in stderr.splitlines() if line not in warned] == [], stderr
    assert "OUT_OF_RANGE" in warned[1]  # the root cause, not orbax's wrapper


# The same two corrupt steps, read four times (the reports of abandoned reads come at random
# times); after each read nothing it installed is left, and whatever the abandoned reads still
# had to report would print while the script sleeps and collects garbage.
REPEATED = textwrap.dedent("""
    import gc, glob, logging as std_logging, os, sys, time
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import logging
    from bnjax.checkpoints import Checkpointer

    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)
    directory = sys.argv[1]
    make = lambda step: {"w": np.arange(4096, dtype=np.float32) + step}
    with Checkpointer(directory, async_save=False) as checkpointer:
        for step in range(3):
            checkpointer.save(step, make(step))
    os.remove(f"{directory}/2/state/manifest.ocdbt")
    files = [f for f in glob.glob(f"{directory}/1/**", recursive=True) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)
    print("restoring", file=sys.stderr, flush=True)
    asyncio_filters = list(std_logging.getLogger("asyncio").filters)
    for attempt in range(4):
        step, _ = Checkpointer(directory, read_only=True).restore_latest(
            jax.tree.map(jnp.asarray, make(0))
        )
        assert step == 0
        assert sys.unraisablehook is sys.__unraisablehook__, sys.unraisablehook
        assert std_logging.getLogger("asyncio").filters == asyncio_filters
        time.sleep(0.2)
        gc.collect()
    print("restored", step)
""")


def test_no_report_of_a_failed_restore_comes_after_it_and_nothing_stays_installed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", REPEATED, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0 and "restored 0" in result.stdout, result.stderr[-3000:]
    stderr = result.stderr.split("restoring\n", 1)[1].splitlines()
    warned = [line for line in stderr if "CheckpointWarning" in line]
    assert len(warned) == 8 and [line for line in stderr if line not in warned] == [], stderr


def _process_wide() -> tuple:
    """What a library call must leave as it found it."""
    return (
        sys.unraisablehook,
        list(logging.getLogger("asyncio").filters),
        list(logging.getLogger("absl").filters),
        asyncio.get_event_loop_policy(),
    )


def test_a_failed_restore_keeps_its_traceback_and_leaves_the_process_as_it_was(tmp_path):
    saved(tmp_path)
    os.remove(tmp_path / "2" / "state" / "manifest.ocdbt")
    checkpointer = Checkpointer(str(tmp_path), read_only=True)
    before = _process_wide()
    with pytest.raises(Exception, match=r"manifest\.ocdbt|NOT_FOUND") as caught:
        checkpointer.restore(2, jax.tree.map(jnp.asarray, state(0)))
    assert _process_wide() == before
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(caught.value.__traceback__)]
    assert "_restore" in frames, frames  # down to the read that failed, not cut at the caller
    with pytest.warns(CheckpointWarning, match="step 2"):
        assert checkpointer.restore_latest()[0] == 1
    assert _process_wide() == before


def test_orbax_save_logs_are_held_back_only_while_a_writer_is_open(tmp_path):
    absl = logging.getLogger("absl")
    gc.collect()  # writers that other tests left unclosed let go when they are collected
    before = list(absl.filters)
    first, second = Checkpointer(str(tmp_path / "a")), Checkpointer(str(tmp_path / "b"))
    assert len(absl.filters) == len(before) + 1  # one filter, however many writers
    first.close()
    assert len(absl.filters) == len(before) + 1  # the second still writes
    second.close()
    assert absl.filters == before
    Checkpointer(str(tmp_path / "c"))  # never closed: let go when collected
    gc.collect()
    assert absl.filters == before


def _cannot_rename(*args, **kwargs):
    raise PermissionError("read-only directory")


@pytest.mark.parametrize("how", ["quarantine off", "rename fails"])
def test_a_corrupt_step_that_stays_in_place_is_replaced_by_save(tmp_path, monkeypatch, how):
    saved(tmp_path)
    flip_bytes(tmp_path / "2")
    if how == "rename fails":  # e.g. no permission to create directory/corrupt
        rename = os.rename

        def no_quarantine(source, target, *args, **kwargs):
            if os.sep + "corrupt" + os.sep in str(target):
                _cannot_rename()
            return rename(source, target, *args, **kwargs)

        monkeypatch.setattr(os, "rename", no_quarantine)
    checkpointer = Checkpointer(str(tmp_path), async_save=False, quarantine=how == "rename fails")
    with pytest.warns(CheckpointWarning, match="step 2 .*fails its checksum"):
        step, _ = checkpointer.restore_latest(state(0))
    assert step == 1 and checkpointer.all_steps() == [0, 1, 2]  # not moved
    assert checkpointer.should_save(2)  # the corrupt step does not block the resumed run
    assert checkpointer.save(2, state(2)) is True  # was False: the final state was lost
    checkpointer.verify(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        step, restored = checkpointer.restore_latest(state(0))
    assert step == 2 and bits(restored) == bits(state(2))
    assert checkpointer.save(2, state(2), force=True) is False  # a good step stays
    checkpointer.close()


def test_save_raises_when_a_corrupt_step_cannot_be_removed(tmp_path, monkeypatch):
    saved(tmp_path)
    flip_bytes(tmp_path / "2")
    checkpointer = Checkpointer(str(tmp_path), async_save=False, quarantine=False)
    with pytest.warns(CheckpointWarning):
        checkpointer.restore_latest(state(0))
    monkeypatch.setattr("bnjax.checkpoints.checkpointer.shutil.rmtree", _cannot_rename)
    with pytest.raises(OSError, match=r"cannot save step 2: .* corrupt checkpoint"):
        checkpointer.save(2, state(2), force=True)
    checkpointer.close()


def test_verify(tmp_path):
    saved(tmp_path, steps=(0, 1))
    checkpointer = Checkpointer(str(tmp_path), async_save=True)
    assert checkpointer.save(2, state(2))
    assert checkpointer.verify(2) is None  # waits for the asynchronous save, then reads it
    checkpointer.verify(2, target=state(0))
    with pytest.raises(CorruptCheckpointError, match=r"step 5 is not in .*steps: \[0, 1, 2\]"):
        checkpointer.verify(5)
    flip_bytes(tmp_path / "1")
    with pytest.raises(CorruptCheckpointError, match=r"step 1 .*'params/w' fails its checksum"):
        checkpointer.verify(1)
    assert checkpointer.save(1, state(1), force=True)  # known corrupt now: replaced
    checkpointer.verify(1)
    checkpointer.close()


def test_read_only_changes_nothing(tmp_path):
    saved(tmp_path)
    flip_bytes(tmp_path / "2")
    unfinished = tmp_path / "3.orbax-checkpoint-tmp"
    unfinished.mkdir()
    before = sorted(os.listdir(tmp_path))
    checkpointer = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(ValueError, match="fails its checksum"):
        checkpointer.restore(2)
    with pytest.warns(CheckpointWarning, match="step 2"):
        assert checkpointer.restore_latest()[0] == 1
    with pytest.raises(ValueError, match="read_only"):
        checkpointer.save(2, state(2), force=True)
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        Checkpointer(str(tmp_path / "missing"), read_only=True)


def test_an_older_format_is_refused_not_quarantined(tmp_path):
    saved(tmp_path, steps=(0,))
    path = tmp_path / "0" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": "bnjax.checkpoint/1"}))
    with Checkpointer(str(tmp_path)) as checkpointer:
        with pytest.raises(CheckpointMismatchError, match="older format"):
            checkpointer.restore_latest(state(0))
        assert checkpointer.all_steps() == [0] and not (tmp_path / "corrupt").exists()


def _unreadable_once(monkeypatch, step):
    """The first read of `step` fails (as an unreadable file would), later ones succeed."""
    restore, failed = Checkpointer._restore, []

    def flaky(self, at, plan):
        if at == step and not failed:
            failed.append(at)
            raise PermissionError(f"[Errno 13] Permission denied: '{at}/state'")
        return restore(self, at, plan)

    monkeypatch.setattr(Checkpointer, "_restore", flaky)


def _nothing_removable(monkeypatch):
    """Neither quarantine nor removal works (e.g. a checkpoint directory without write access)."""
    monkeypatch.setattr(os, "rename", _cannot_rename)
    monkeypatch.setattr("bnjax.checkpoints.checkpointer.shutil.rmtree", _cannot_rename)


def test_an_unremovable_step_that_reads_back_equal_counts_as_saved(tmp_path, monkeypatch):
    saved(tmp_path)
    _unreadable_once(monkeypatch, 2)
    _nothing_removable(monkeypatch)
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    with pytest.warns(CheckpointWarning, match="step 2 .*Permission denied"):
        assert checkpointer.restore_latest(state(0))[0] == 1
    # Re-trained, the state of step 2 is the one on disk: nothing to replace (it was an OSError).
    assert checkpointer.save(2, state(2), force=True) is False
    checkpointer.verify(2)
    assert checkpointer.restore_latest(state(0))[0] == 2
    # A different state cannot be stored over a step that cannot be removed: one clear error.
    _unreadable_once(monkeypatch, 2)
    with pytest.warns(CheckpointWarning):
        checkpointer.restore_latest(state(0))
    with pytest.raises(OSError, match=r"cannot save step 2: .* cannot be removed"):
        checkpointer.save(2, state(3), force=True)
    checkpointer.close()
