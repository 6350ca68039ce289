"""The study's workdir, the mechanism it shares with training (`bnjax.train.workdir`): the lock,
the config check (presentation keys may change, anything else is refused by name), the config
format of earlier studies, atomic results, and the CLI's exit code for each refusal. Apart from
the committed study's resume (which trains nothing), nothing here trains."""

import builtins
import json
import os
import shutil
import subprocess
import sys

import pytest

from bnjax.study import report, runner
from bnjax.train import workdir as workdirs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import batch_study

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

# Two results rows, each naming its run (the columns `runner.row_id` reads).
ROWS = [
    {
        "dataset": "clusters",
        "family": "lr",
        "condition": "uniform",
        "normalizer": normalizer,
        "seed": 0,
        "learning_rate": 0.1,
        "bn_momentum": 0.9,
        "examples": 9600,
        "accuracy_eval": 0.75,
    }
    for normalizer in ("batch", "none")
]


def _quick():
    return batch_study.get_config("quick")


def _old_format(config) -> str:
    """study_config.json as the study wrote it before it shared training's `save_config`:
    indented by 1, no presentation keys, no final newline."""
    values = {k: v for k, v in config.to_dict().items() if k not in runner.PRESENTATION_KEYS}
    return json.dumps(values, sort_keys=True, default=str, indent=1)


def _contents(directory) -> dict[str, str]:
    return {name: open(os.path.join(directory, name)).read() for name in os.listdir(directory)}


def _a_started_study(directory, config=None) -> str:
    """A workdir holding `config`'s study (default: `_quick()`) with `ROWS[:1]` finished."""
    directory = str(directory)
    workdirs.save_config(config or _quick(), directory, runner.CONFIG_FILE)
    report.write_csv(ROWS[:1], os.path.join(directory, "results.csv"))
    return directory


def test_a_held_lock_stops_the_study_at_once(tmp_path):
    """The study takes training's lock: a second study (or a training run) on the workdir
    stops before anything is read or written."""
    with workdirs.WorkdirLock(str(tmp_path)):
        with pytest.raises(runner.StudyStartError, match=r"another run \(process \d+\) is using"):
            runner.run_study(_quick(), str(tmp_path), log=lambda line: None)
    assert os.listdir(tmp_path) == [".lock"]


def test_a_changed_config_is_refused_naming_each_key(tmp_path):
    workdir = _a_started_study(tmp_path)
    before = _contents(workdir)
    config = _quick()
    config.num_seeds, config.lr_candidates = 3, (0.05,)
    with pytest.raises(runner.StudyStartError) as info:
        runner.run_study(config, workdir, log=lambda line: None)
    message = str(info.value)
    assert isinstance(info.value.__cause__, workdirs.ConfigChangedError)
    assert "config.num_seeds: 2 -> 3" in message
    assert "config.lr_candidates: [0.1, 0.3] -> [0.05]" in message
    assert "different config" in message and "new --workdir" in message
    assert "plots" not in message  # unchanged keys are not listed
    assert _contents(workdir) == before  # nothing written, no lock file left


def test_presentation_keys_may_change_and_are_noted(tmp_path):
    workdir = _a_started_study(tmp_path)
    config = _quick()
    config.plots, config.bootstrap_resamples = False, 100
    lines = []
    rows = runner._claim_resume(config, workdir, lines.append)
    assert [runner.row_id(row) for row in rows] == [runner.row_id(ROWS[0])]
    assert lines == [
        "note: resuming with config.bootstrap_resamples: 2000 -> 100",
        "note: resuming with config.plots: True -> False",
    ]
    saved = workdirs.load_config(workdir, runner.CONFIG_FILE)  # the values now in effect
    assert (saved["plots"], saved["bootstrap_resamples"]) == (False, 100)


def test_an_old_format_study_config_still_resumes_and_is_still_checked(tmp_path):
    workdir = _a_started_study(tmp_path)
    with open(os.path.join(workdir, runner.CONFIG_FILE), "w") as f:
        f.write(_old_format(_quick()))
    changed = _quick()
    changed.example_budget = 4800
    with pytest.raises(workdirs.ConfigChangedError, match=r"config.example_budget: \d+ -> 4800"):
        runner._claim_resume(changed, workdir, lambda line: None)
    rows = runner._claim_resume(_quick(), workdir, lambda line: None)
    assert [runner.row_id(row) for row in rows] == [runner.row_id(ROWS[0])]
    # Rewritten in the shared format, presentation keys included.
    with open(os.path.join(workdir, runner.CONFIG_FILE)) as f:
        assert json.load(f) == json.loads(json.dumps(_quick().to_dict()))


def test_the_committed_study_resumes_without_training_and_writes_the_same_tables(tmp_path):
    """docs/study/ was written with the old study_config.json format: resumed with the default
    config it trains nothing and writes table.md and verdicts.md byte for byte again."""
    docs = os.path.join(ROOT, "docs", "study")
    for name in ("results.csv", runner.CONFIG_FILE):
        shutil.copy(os.path.join(docs, name), tmp_path)
    config = batch_study.get_config()
    config.plots, config.progress = False, False
    lines = []
    rows = runner.run_study(config, str(tmp_path), log=lines.append)
    assert len(rows) == runner.planned_runs(config)
    assert "(0 cells trained now)" in lines[-1]
    for name in ("table.md", "verdicts.md"):
        with open(os.path.join(docs, name)) as committed, open(tmp_path / name) as written:
            assert written.read() == committed.read(), name


def test_results_csv_stays_whole_when_a_rewrite_fails_midway(tmp_path, monkeypatch):
    """The runner rewrites results.csv after every cell: a write that fails halfway (a full
    disk) leaves the previous rows whole, and no temporary file."""
    path = str(tmp_path / "results.csv")
    report.write_csv(ROWS[:1], path)
    before = open(path).read()

    class HalfWritten:
        def __init__(self, handle):
            self.handle = handle

        def write(self, content):
            self.handle.write(content[: len(content) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(
        workdirs, "open", lambda *a, **k: HalfWritten(builtins.open(*a, **k)), raising=False
    )
    with pytest.raises(OSError, match="No space"):
        report.write_csv(ROWS, path)
    monkeypatch.undo()
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ["results.csv"]
    assert report.read_csv(path) == ROWS[:1]


def _script(*args, config="configs/batch_study.py:quick"):
    command = [sys.executable, "scripts/batch_study.py", f"--config={config}", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_script_exits_2_on_a_busy_workdir(tmp_path):
    with workdirs.WorkdirLock(str(tmp_path)):
        result = _script(f"--workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "another run (process" in _one_error_line(result)


@pytest.mark.parametrize(
    "case, message",
    [
        ("another config", "config.num_seeds: 5 -> 2"),
        ("damaged config", "study_config.json is not valid JSON"),
        ("a training run", "holds a training run (config.json), not a study"),
        ("config file raises", "the config file did not load: ZeroDivisionError"),
    ],
)
def test_script_exits_2_when_the_study_cannot_start(tmp_path, case, message):
    workdir, config = tmp_path / "study", "configs/batch_study.py:quick"
    workdir.mkdir()
    if case == "another config":
        other = _quick()
        other.num_seeds = 5
        _a_started_study(workdir, other)
    elif case == "damaged config":
        _a_started_study(workdir)
        (workdir / runner.CONFIG_FILE).write_text('{"num_seeds": 2,')
    elif case == "a training run":
        (workdir / "config.json").write_text("{}")
    else:
        config = str(tmp_path / "raises.py")
        with open(config, "w") as f:
            f.write("def get_config():\n    return 1 / 0\n")
    before = _contents(workdir)
    result = _script(f"--workdir={workdir}", config=config)
    assert result.returncode == 2, result.stderr
    assert message in _one_error_line(result)
    assert _contents(workdir) == before  # refused before anything was written
