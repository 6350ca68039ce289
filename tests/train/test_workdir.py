"""`bnjax.train.workdir` as both applications use it: each refuses the other's workdir, the
config is written atomically (file and directory synced), and the bookkeeping keys are the
caller's."""

import os
import stat

import pytest

from bnjax.train import workdir as workdirs


@pytest.mark.parametrize(
    "application, other_file, other",
    [
        (workdirs.TRAINING, workdirs.STUDY_CONFIG_FILE, "study"),
        (workdirs.STUDY, workdirs.CONFIG_FILE, "training run"),
    ],
)
def test_an_application_refuses_the_other_ones_workdir(tmp_path, application, other_file, other):
    (tmp_path / other_file).write_text("{}")
    with pytest.raises(workdirs.WorkdirError, match=f"holds a {other} \\({other_file}\\)"):
        workdirs.check_workdir(str(tmp_path), application)
    workdirs.check_workdir(str(tmp_path / "fresh"), application)  # a new one is fine


def test_the_study_entries_are_checked_too(tmp_path):
    (tmp_path / "results.csv").mkdir()
    with pytest.raises(workdirs.WorkdirError, match=r"results\.csv is a directory"):
        workdirs.check_workdir(str(tmp_path), workdirs.STUDY)
    workdirs.check_workdir(str(tmp_path))  # not an entry of a training run


def test_save_config_is_atomic_and_syncs_the_file_and_its_directory(tmp_path, monkeypatch):
    workdirs.save_config({"learning_rate": 0.05}, str(tmp_path))
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    workdirs.save_config({"learning_rate": 0.1}, str(tmp_path), "study_config.json")
    assert synced == [False, True]  # the file, then the directory holding the rename

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        workdirs.save_config({"learning_rate": 0.2}, str(tmp_path))
    assert workdirs.load_config(str(tmp_path)) == {"learning_rate": 0.05}  # the old one, whole
    assert sorted(os.listdir(tmp_path)) == ["config.json", "study_config.json"]


def test_the_bookkeeping_keys_are_the_callers():
    saved, current = {"plots": True, "log_every": 50}, {"plots": False, "log_every": 10}
    assert workdirs.config_changes(saved, current) == (
        ["config.plots: True -> False"],
        ["config.log_every: 50 -> 10"],
    )
    with pytest.raises(workdirs.ConfigChangedError, match=r"log_every: 50 -> 10\. Start over\."):
        workdirs.check_resume_config(
            saved, current, allow_changes=False, bookkeeping_keys=("plots",), remedy="Start over."
        )
