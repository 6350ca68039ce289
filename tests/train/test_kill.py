"""SIGKILL at random moments (and right before a commit) never costs a committed checkpoint.

A worker process (checkpoint_worker.py) resumes from DIR and saves 8 MiB states back to back,
asynchronously, until it is killed. After every kill, this process reopens DIR and must
restore, without a single warning, a state bitwise equal to the deterministic state of its
step, and no older than the step before the last save the worker reported.
"""

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest

from bnjax.train import CheckpointWarning
from tests.train.checkpoint_worker import bits, open_checkpointer, state_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMP = ".orbax-checkpoint-tmp"


def _start(directory, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "tests.train.checkpoint_worker", directory, *extra]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    if not line.startswith("ready"):
        process.kill()
        pytest.fail(f"worker did not start: {line!r} {process.communicate()[1][-2000:]}")
    return process, int(line.split()[1])


def _saved(stdout):
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("saved")]


def _check(directory):
    """Reopens `directory`: no tmp directory left, and an exact, warning-free restore."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        checkpointer = open_checkpointer(directory)
        assert not [name for name in os.listdir(directory) if TMP in name]
        step, state = checkpointer.restore_latest(state_for(0))
        checkpointer.close()
    assert bits(state) == bits(state_for(step))
    return step


def test_sigkill_at_random_moments(tmp_path):
    directory = str(tmp_path)
    # Killed just before orbax renames the finished tmp directory of step 3 (its commit).
    process, _ = _start(directory, "--kill-before-commit", "3")
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL
    assert os.path.isdir(os.path.join(directory, "3" + TMP))
    assert _check(directory) == 2

    rng = random.Random(7)
    killed_mid_save = 0
    for delay in [0.05, 0.15, 0.3, 0.5, 0.8]:
        process, first = _start(directory)
        time.sleep(delay + rng.uniform(0, 0.1))
        process.send_signal(signal.SIGKILL)
        saved = _saved(process.communicate(timeout=60)[0])
        killed_mid_save += any(TMP in name for name in os.listdir(directory))
        step = _check(directory)
        # save(s) returns after save(s - 1) committed: nothing committed was lost.
        assert step >= (saved[-1] - 1 if saved else first - 1)
    assert step > 3, "the workers never saved"
    print(f"{killed_mid_save} of 5 kills landed during a save; resumed up to step {step}")
