"""The failures around a run (full disk, read-only or odd workdirs, damaged files, arguments)
end in one ``error:`` line and the documented exit status, and never cost a saved step.

What is simulated, and how: a full disk is an OSError(ENOSPC) raised by the write itself (in
orbax's background writer for checkpoints, in the metric log's file); a read-only workdir is
an EACCES from opening its lock (these tests run as root, for whom chmod refuses nothing), and
the test then checks that nothing at all is written. `test_a_chmod_read_only_workdir` does it
for real where the tests do not run as root.
"""

import errno
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

import chex
import pytest

from bnjax.checkpoints import Checkpointer, UnsafeStateError
from bnjax.train import cli, loop, read_metrics
from bnjax.train.metrics import MetricWriter
from tests.train.conftest import SMALL_RUN
from tests.train.helpers import final_state, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = SMALL_RUN


def _config(**overrides):
    return tiny_config(**(SETTINGS | overrides))


def _cli(workdir, capsys, config=None):
    """(exit status, stderr lines, stdout) of the command line's run of `config` in `workdir`."""
    config = config or _config()
    try:
        cli.run(lambda: loop.train_and_evaluate(config, str(workdir)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def _tree(directory):
    """Every path under `directory` with its kind, size, modification time and content hash."""
    listing = {}
    for path in sorted(glob.glob(f"{directory}/**", recursive=True) + glob.glob(f"{directory}/.*")):
        stat = os.stat(path)
        digest = None
        if os.path.isfile(path):
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        listing[os.path.relpath(path, directory)] = (os.path.isdir(path), stat.st_mtime_ns, digest)
    return listing


@pytest.fixture
def finished(small_run):
    """A finished run: (workdir, its records); tests change copies of it only."""
    return small_run[:2]


def _copy(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def _without_time(records):
    return [{k: v for k, v in record.items() if k != "time"} for record in records]


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_step(
    tmp_path, monkeypatch, capsys, caplog
):
    from orbax.checkpoint._src.serialization import serialization

    write, full = serialization.async_serialize_from_host, []

    async def no_space(*args, **kwargs):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(*args, **kwargs)

    save = Checkpointer.save

    def fill_the_disk_at_step_4(self, step, state, **options):
        if step == 4:
            # Step 2's asynchronous write must land before the disk fills, or (on a loaded
            # machine) it is step 2 whose files meet the full disk.
            self.wait_until_finished()
            full.append(True)
        return save(self, step, state, **options)

    monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)
    monkeypatch.setattr(Checkpointer, "save", fill_the_disk_at_step_4)
    code, err, _ = _cli(tmp_path, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: checkpoint step 4 could not be written to "), err
    assert "No space left on device" in err[0] and "newest committed step is 2, intact" in err[0]
    orbax_errors = [r for r in caplog.records if "orbax" in r.pathname and r.levelname == "ERROR"]
    assert not orbax_errors, [r.getMessage()[:200] for r in orbax_errors]
    with Checkpointer(str(tmp_path / "checkpoints")) as checkpointer:
        assert checkpointer.all_steps() == [2]
        checkpointer.verify(2)


def test_a_full_disk_while_logging_is_one_line_and_the_rerun_logs_every_step(
    finished, tmp_path, monkeypatch, capsys
):
    opened = MetricWriter.__init__

    class FullDisk:
        """The metric log's file, on a disk that is full from step 6 on."""

        def __init__(self, file):
            self.file = file

        def write(self, text):
            if '"step": 6,' in text:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def open_on_a_full_disk(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self._jsonl = FullDisk(self._jsonl)

    monkeypatch.setattr(MetricWriter, "__init__", open_on_a_full_disk)
    code, err, _ = _cli(tmp_path, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: OSError: [Errno 28] No space left on device: cannot write ")
    assert "metrics of step 6" in err[0]
    monkeypatch.undo()
    assert _cli(tmp_path, capsys)[0] == 0  # space freed: the same command finishes the log
    assert _without_time(read_metrics(str(tmp_path))) == _without_time(finished[1])


# --------------------------------------------------------------------------- a step that stays


def _unreadable_once(monkeypatch, step):
    restore, failed = Checkpointer._restore, []

    def flaky(self, at, plan):
        if at == step and not failed:
            failed.append(at)
            raise PermissionError(f"[Errno 13] Permission denied: '{at}/state'")
        return restore(self, at, plan)

    monkeypatch.setattr(Checkpointer, "_restore", flaky)


def _nothing_removable(monkeypatch):
    """Quarantine and removal of a step fail, as in a checkpoint directory one cannot write."""
    rename = os.rename

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def rename_but_not_to_corrupt(source, target, *args, **kwargs):
        if f"{os.sep}corrupt{os.sep}" in str(target):
            refuse()
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename_but_not_to_corrupt)
    monkeypatch.setattr("bnjax.checkpoints.checkpointer.shutil.rmtree", refuse)


def test_an_unreadable_final_step_that_cannot_be_moved_is_kept_when_retrained_equal(
    finished, tmp_path, monkeypatch, capsys
):
    workdir = _copy(finished, tmp_path)
    reference = final_state(workdir)
    _unreadable_once(monkeypatch, 8)
    _nothing_removable(monkeypatch)
    code, err, out = _cli(workdir, capsys)
    assert code == 0, err
    # Step 8 was skipped, trained again from step 6, and found equal to the copy on disk.
    assert f"resumed from {workdir}/checkpoints step 6" in out
    assert _without_time(read_metrics(str(workdir))) == _without_time(finished[1])
    monkeypatch.undo()
    step, state = final_state(workdir)
    assert step == 8
    chex.assert_trees_all_equal(state, reference[1])


def test_a_corrupt_final_step_that_cannot_be_replaced_fails_in_one_line(
    finished, tmp_path, monkeypatch, capsys
):
    workdir = _copy(finished, tmp_path)
    files = glob.glob(f"{workdir}/checkpoints/8/state/**/d/*", recursive=True)
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:  # other bytes: the retrained state differs from them
        handle.seek(os.path.getsize(largest) // 2)
        handle.write(b"\x00\x01" * 8)
    _nothing_removable(monkeypatch)
    with pytest.warns(UserWarning, match="step 8"):
        code, err, _ = _cli(workdir, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: cannot save step 8: ") and "cannot be removed" in err[0]


# --------------------------------------------------------------------------- the workdir


def test_a_read_only_finished_workdir_is_reported_and_nothing_is_written(
    finished, tmp_path, monkeypatch, capsys
):
    workdir = _copy(finished, tmp_path)
    before = _tree(workdir)
    real_open = open

    def no_write_access(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("bnjax.train.workdir.open", no_write_access, raising=False)
    code, err, out = _cli(workdir, capsys)
    assert code == 0, err
    assert "already finished: step 8 of 8 (the workdir is read-only: nothing was written)" in out
    assert _tree(workdir) == before
    # With steps left to train, it cannot go on: one line, exit 2.
    shutil.rmtree(workdir / "checkpoints" / "8")
    code, err, _ = _cli(workdir, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write in the workdir {workdir} (Permission denied")


def _chmod_all(workdir, writable: bool) -> None:
    for directory, _, files in os.walk(workdir):
        os.chmod(directory, 0o755 if writable else 0o555)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644 if writable else 0o444)


@pytest.mark.skipif(
    os.geteuid() == 0 and not os.environ.get("BNJAX_TEST_WITHOUT_DAC_OVERRIDE"),
    reason="root writes through chmod: simulated above",
)
@pytest.mark.parametrize("how", ["everything", "the workdir only"])
def test_a_chmod_read_only_workdir(finished, tmp_path, capsys, how):
    """Without root's override (or under ``setpriv --inh-caps=-dac_override ...`` with
    BNJAX_TEST_WITHOUT_DAC_OVERRIDE=1), a workdir made read-only by chmod for real."""
    workdir = _copy(finished, tmp_path / "run")
    before = _tree(workdir)
    if how == "everything":
        _chmod_all(workdir, writable=False)
    else:
        os.chmod(workdir, 0o555)
    try:
        code, err, out = _cli(workdir, capsys)
    finally:
        _chmod_all(workdir, writable=True)
    assert code == 0 and "the workdir is read-only" in out, err
    assert _tree(workdir) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda w: (w / ".lock").mkdir(), r"\.lock is a directory, where the run keeps its lock"),
        (
            lambda w: (w / "metrics.jsonl").mkdir(),
            r"metrics\.jsonl is a directory, where the run keeps its metric log",
        ),
        (lambda w: (w / "checkpoints").write_text(""), r"checkpoints is a file, where the run"),
    ],
)
def test_a_directory_where_the_run_keeps_a_file_is_one_line(tmp_path, capsys, make, message):
    make(tmp_path)
    code, err, _ = _cli(tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err


def test_a_workdir_that_is_a_file_or_empty_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for workdir, message in [
        (tmp_path / "file", f"error: workdir '{tmp_path / 'file'}': {tmp_path / 'file'} is a file"),
        (tmp_path / "file" / "run", f"{tmp_path / 'file'} is a file, not a directory"),
        ("", "error: the workdir is empty: pass --workdir=DIR"),
    ]:
        code, err, _ = _cli(workdir, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert os.listdir(tmp_path) == ["file"] and not os.path.exists("checkpoints")


# --------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"seed": 0,\n  "norm": "batch"', "is not valid JSON (Expecting"),
        ("[1, 2]", "holds a JSON list, not the config object a run writes"),
    ],
)
def test_a_damaged_config_json_is_one_line_naming_the_file(
    finished, tmp_path, capsys, text, message
):
    workdir = _copy(finished, tmp_path)
    (workdir / "config.json").write_text(text)
    code, err, _ = _cli(workdir, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {workdir / 'config.json'} ") and message in err[0], err


def test_an_edited_config_json_names_the_key(finished, tmp_path, capsys):
    workdir = _copy(finished, tmp_path)
    text = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(text.replace('"norm": "batch"', '"norm": "group"'))
    code, err, _ = _cli(workdir, capsys)
    assert code == 2 and len(err) == 1, err
    assert "config.norm: 'group' -> 'batch'" in err[0]


def test_a_deleted_config_json_is_noted(finished, tmp_path, capsys):
    workdir = _copy(finished, tmp_path)
    os.remove(workdir / "config.json")
    code, _, out = _cli(workdir, capsys)
    assert code == 0 and f"note: {workdir / 'config.json'} is missing" in out


# --------------------------------------------------------------------------- exit statuses


def test_a_state_refused_at_its_checkpoint_is_a_failed_run_not_a_bad_start(capsys):
    """A diverged run (parameters non-finite, the loss not yet) is refused by the save:
    it trained, so it failed (exit 1), it did not fail to start (exit 2)."""

    def diverged():
        raise UnsafeStateError("refusing to checkpoint step 200: params/conv0/kernel (non-finite)")

    with pytest.raises(SystemExit) as exit_:
        cli.run(diverged)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: refusing to checkpoint step 200")


def test_an_extra_positional_argument_is_one_line_and_exit_2(tmp_path):
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        "--config=" + os.path.join(ROOT, "configs", "default.py"),
        f"--workdir={tmp_path}",
        "extra",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "error: unexpected argument(s) 'extra': every setting is a flag (--config.KEY=VALUE, "
        f"--workdir=DIR; see {command[1]} --help)."
    ]
    assert not os.listdir(tmp_path)
