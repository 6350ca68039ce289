"""A run stopped at any point (SIGKILL, SIGINT/SIGTERM/SIGHUP) leaves a complete log and
resumes bit-identically.

The stops land at exact points: tests/train/train_worker.py runs scripts/train.py and sends
itself the signal (a real one) right after a chosen save, or after a chosen step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import pytest

from bnjax.checkpoints import Checkpointer
from bnjax.progress import Progress
from bnjax.train import cli, loop, read_metrics
from tests.train.conftest import SMALL_RUN
from tests.train.helpers import final_state, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = SMALL_RUN


def _flags(workdir):
    """scripts/train.py's flags for the run of `SETTINGS` in `workdir`."""
    values = [
        f"--config.{key}={value if isinstance(value, str) else repr(value)}"
        for key, value in SETTINGS.items()
    ]
    config_file = os.path.join(ROOT, "configs", "default.py")
    return [f"--config={config_file}", f"--workdir={workdir}", *values]


def _worker(plan, workdir):
    command = [sys.executable, "-m", "tests.train.train_worker", plan, "--", *_flags(workdir)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _records(workdir):
    """metrics.jsonl without the wall times."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(str(workdir))]


def _steps(workdir):
    with Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
        return checkpointer.all_steps()


@pytest.fixture
def whole(small_run):
    """The uninterrupted run: (workdir, its records without wall times, its final state)."""
    workdir, _, final = small_run
    return workdir, _records(workdir), final


def test_a_kill_after_a_checkpoint_commits_loses_no_record(tmp_path, whole):
    _, records, (_, state) = whole
    workdir = tmp_path / "killed"
    # SIGKILL once the final checkpoint (step 8) is committed, before its record is written.
    result = _worker("kill-after-commit:8", workdir)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert _steps(workdir) == [4, 6, 8] and [r["step"] for r in _records(workdir)] == [2, 4, 6]
    # The re-run finds the run finished: it writes step 8's record, the same as uninterrupted.
    loop.train_and_evaluate(tiny_config(**SETTINGS), str(workdir))
    assert _records(workdir) == records
    loop.train_and_evaluate(tiny_config(**SETTINGS), str(workdir))  # never twice
    assert _records(workdir) == records

    # The same kill at step 4, mid-run: what it leaves is step 4 committed, its record not.
    shutil.rmtree(workdir / "checkpoints" / "6")
    shutil.rmtree(workdir / "checkpoints" / "8")
    kept = [line for line in open(workdir / "metrics.jsonl") if '"step": 2,' in line]
    (workdir / "metrics.jsonl").write_text("".join(kept))
    loop.train_and_evaluate(tiny_config(**SETTINGS), str(workdir))
    assert _records(workdir) == records
    chex.assert_trees_all_equal(final_state(workdir)[1], state)


def test_a_record_rebuilt_without_training_scalars_keeps_the_evaluation(tmp_path, whole):
    """A checkpoint written without its step's training scalars (an older bnjax): the rebuilt
    record holds what can be known again, the evaluation and the learning rate."""
    source, records, _ = whole
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    manifest = tmp_path / "checkpoints" / "8" / "manifest" / "metadata"
    saved = json.loads(manifest.read_text())
    saved.pop("scalars")
    manifest.write_text(json.dumps(saved))
    kept = [line for line in open(tmp_path / "metrics.jsonl") if '"step": 8,' not in line]
    (tmp_path / "metrics.jsonl").write_text("".join(kept))
    loop.train_and_evaluate(tiny_config(**SETTINGS), str(tmp_path))
    rebuilt = _records(tmp_path)[-1]
    expected = {k: v for k, v in records[-1].items() if k.startswith("eval/") or k == "step"}
    assert rebuilt == expected | {"learning_rate": records[-1]["learning_rate"]}


@pytest.mark.parametrize(
    ("plan", "code", "step"),
    [
        # Off the checkpoint grid: step 3 is saved on the way out. The in-process test below
        # covers each signal's handling and exit status in the default suite.
        pytest.param("SIGINT-at-step:3", 130, 3, marks=pytest.mark.slow),
        pytest.param("SIGTERM-during-save:4", 143, 4, marks=pytest.mark.slow),
        pytest.param("SIGHUP-at-step:6", 129, 6, marks=pytest.mark.slow),
    ],
)
def test_a_signal_stops_at_a_step_with_one_line_and_resumes_bit_identically(
    tmp_path, whole, plan, code, step
):
    _, records, (_, state) = whole
    result = _worker(plan, tmp_path)
    assert result.returncode == code, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"interrupted at step {step}; resume with the same command"
    ]
    assert max(_steps(tmp_path)) == step  # the stopped step is on disk, verified below
    Checkpointer(str(tmp_path / "checkpoints")).verify(step)
    loop.train_and_evaluate(tiny_config(**SETTINGS), str(tmp_path))
    chex.assert_trees_all_equal(final_state(tmp_path)[1], state)
    assert _records(tmp_path) == records


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_each_stop_signal_maps_to_its_exit_status(tmp_path, whole, monkeypatch, capsys, number):
    """In this process: the handler, the save on the way out, the command line's one line and
    exit status; then the resume (for SIGINT), bit-identical."""
    update = Progress.update

    def signal_at_step_3(self, completed, message=""):
        update(self, completed, message)
        if completed == 3:
            os.kill(os.getpid(), number)

    monkeypatch.setattr(Progress, "update", signal_at_step_3)
    config = tiny_config(**SETTINGS)
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: loop.train_and_evaluate(config, str(tmp_path)))
    assert stopped.value.code == 128 + number
    assert capsys.readouterr().err == "interrupted at step 3; resume with the same command\n"
    assert _steps(tmp_path) == [2, 3]  # step 3, off the checkpoint grid, saved on the way out
    # The handlers are the previous ones again once the run has stopped.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if number == signal.SIGINT:
        monkeypatch.undo()
        loop.train_and_evaluate(config, str(tmp_path))
        chex.assert_trees_all_equal(final_state(tmp_path)[1], whole[2][1])
        assert _records(tmp_path) == whole[1]
