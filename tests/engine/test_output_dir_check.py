"""``check_output_dir``: a writable folder passes and leaves nothing; runs started together on one
new folder (the machines of one job) do not refuse each other's OUTPUT_DIR."""

import os
import tempfile

import pytest

from san_det.engine import setup as engine_setup
from san_det.engine.setup import check_output_dir
from san_det.errors import UserInputError


def test_a_new_folder_passes_and_is_removed_again(tmp_path):
    target = tmp_path / "a" / "b"
    check_output_dir(str(target))
    assert not (tmp_path / "a").exists()


def test_a_folder_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match=r"OUTPUT_DIR '.*file/out' cannot be written"):
        check_output_dir(str(tmp_path / "file" / "out"))


def test_a_folder_removed_by_another_runs_check_is_checked_again(tmp_path, monkeypatch):
    """Machine 1 sees the folder machine 0 made for its check; machine 0 removes it before
    machine 1 writes its probe file (seen as a flaky two-machine test)."""
    target = tmp_path / "machines"
    target.mkdir()
    real = tempfile.NamedTemporaryFile
    calls = []

    def other_run_cleans_up_first(*args, **kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            os.rmdir(kwargs["dir"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_setup.tempfile, "NamedTemporaryFile", other_run_cleans_up_first)
    check_output_dir(str(target))
    assert len(calls) == 2


def test_a_folder_another_run_wrote_into_is_left_in_place(tmp_path, monkeypatch):
    target = tmp_path / "shared"
    real = tempfile.NamedTemporaryFile

    def other_run_writes(*args, **kwargs):
        (target / "log.txt").write_text("the other run")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_setup.tempfile, "NamedTemporaryFile", other_run_writes)
    check_output_dir(str(target))
    assert (target / "log.txt").read_text() == "the other run"
