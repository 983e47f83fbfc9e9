"""san_det.utils.atomic: a file or folder is replaced whole or not at all, and leaves no temporary."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from san_det.utils.atomic import (
    atomic_directory,
    atomic_write,
    pid_alive,
    remove_orphaned_temporaries,
    remove_temporaries,
    temporary_name,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _listing(folder):
    return sorted(os.listdir(folder))


def _tree(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_write(str(path)) as f:
        f.write(b"new content")
        assert path.read_bytes() == b"old"  # not visible before the end
        assert os.path.basename(f.name) == f".out.bin.tmp-{os.getpid()}"
    assert path.read_bytes() == b"new content"
    assert _listing(tmp_path) == ["out.bin"]
    with atomic_write(str(tmp_path / "text.txt"), "w", encoding="utf-8") as f:
        f.write("héllo")
    assert (tmp_path / "text.txt").read_text(encoding="utf-8") == "héllo"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "model.pth"
    path.write_bytes(b"the good old checkpoint")
    with pytest.raises(error):
        with atomic_write(str(path)) as f:
            f.write(b"half of a new one")
            f.flush()
            raise error("disk full")
    assert path.read_bytes() == b"the good old checkpoint"
    assert _listing(tmp_path) == ["model.pth"]
    # no file before: still none after a failure
    with pytest.raises(error):
        with atomic_write(str(tmp_path / "new.pth")) as f:
            raise error("killed")
    assert _listing(tmp_path) == ["model.pth"]


def test_atomic_write_refuses_a_reading_mode(tmp_path):
    with pytest.raises(ValueError, match="writing mode"):
        with atomic_write(str(tmp_path / "x"), "rb"):
            pass
    assert _listing(tmp_path) == []


@pytest.mark.slow
def test_sigkill_mid_write_keeps_the_old_file_and_the_next_run_removes_the_orphan(tmp_path):
    path = tmp_path / "last_checkpoint"
    path.write_text("model_0000001.pth")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from san_det.utils.atomic import atomic_write
        with atomic_write({str(path)!r}) as f:
            f.write(b"model_00")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert path.read_text() == "model_0000001.pth"
    orphan = tmp_path / f".last_checkpoint.tmp-{proc.pid}"
    assert _listing(tmp_path) == sorted(["last_checkpoint", orphan.name])
    assert orphan.read_bytes() == b"model_00" and not pid_alive(proc.pid)
    mine = tmp_path / os.path.basename(temporary_name(str(tmp_path / "other")))
    mine.write_text("being written by this (live) process")
    removed = []
    remove_orphaned_temporaries(str(tmp_path), on_remove=removed.append)
    assert removed == [str(orphan)]
    assert _listing(tmp_path) == sorted(["last_checkpoint", mine.name])


def test_pid_alive():
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)


def test_atomic_directory_swaps_the_whole_folder_in(tmp_path):
    target = tmp_path / "split"
    (target / "images").mkdir(parents=True)
    (target / "images" / "old.jpg").write_bytes(b"old")
    with atomic_directory(str(target)) as staging:
        assert os.path.dirname(staging) == str(tmp_path)
        assert os.path.basename(staging).startswith(f".split.tmp-{os.getpid()}-")
        os.makedirs(os.path.join(staging, "images"))
        with open(os.path.join(staging, "images", "new.jpg"), "wb") as f:
            f.write(b"new")
        assert _tree(target) == {os.path.join("images", "old.jpg"): b"old"}
    assert _tree(target) == {os.path.join("images", "new.jpg"): b"new"}
    assert _listing(tmp_path) == ["split"]


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failure_while_staging_a_folder_leaves_the_old_one(tmp_path, error):
    target = tmp_path / "split"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(error):
        with atomic_directory(str(target)) as staging:
            open(os.path.join(staging, "a.txt"), "w").write("new, half")
            raise error("interrupted")
    assert _tree(target) == {"a.txt": b"old"}
    assert _listing(tmp_path) == ["split"]
    with pytest.raises(error):
        with atomic_directory(str(tmp_path / "fresh")):
            raise error("interrupted")
    assert _listing(tmp_path) == ["split"]


def test_a_finished_copy_of_a_concurrent_writer_is_kept(tmp_path):
    target = tmp_path / "digits"

    def complete(folder):
        return os.path.isfile(os.path.join(folder, "manifest.json"))

    with atomic_directory(str(target), complete=complete) as staging:
        open(os.path.join(staging, "manifest.json"), "w").write("ours")
        target.mkdir()  # another process finished first
        (target / "manifest.json").write_text("theirs")
    assert (target / "manifest.json").read_text() == "theirs"
    assert _listing(tmp_path) == ["digits"]

    # an unfinished one is replaced; replace_complete replaces a finished one too
    (target / "manifest.json").unlink()
    with atomic_directory(str(target), complete=complete) as staging:
        open(os.path.join(staging, "manifest.json"), "w").write("ours")
    assert (target / "manifest.json").read_text() == "ours"
    with atomic_directory(str(target), complete=complete, replace_complete=True) as staging:
        open(os.path.join(staging, "manifest.json"), "w").write("forced")
    assert (target / "manifest.json").read_text() == "forced"
    assert _listing(tmp_path) == ["digits"]


def test_merge_moves_the_staged_entries_into_the_folder(tmp_path):
    out = tmp_path / "predictions"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("user's file")
    (out / "sub" / "a.png").write_bytes(b"old a")
    (out / "results.json").write_text("old")
    with atomic_directory(str(out), merge=True) as staging:
        assert os.path.dirname(staging) == str(out)
        os.makedirs(os.path.join(staging, "sub"))
        open(os.path.join(staging, "sub", "b.png"), "wb").write(b"b")
        open(os.path.join(staging, "results.json"), "w").write("new")
        assert (out / "results.json").read_text() == "old"
    assert _tree(out) == {
        "keep.txt": b"user's file",
        "results.json": b"new",
        os.path.join("sub", "a.png"): b"old a",
        os.path.join("sub", "b.png"): b"b",
    }
    assert _listing(out) == ["keep.txt", "results.json", "sub"]


def test_a_failed_merge_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "results.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(out), merge=True) as staging:
            open(os.path.join(staging, "results.json"), "w").write("new")
            raise RuntimeError("unreadable image")
    assert _tree(out) == {"results.json": b"old"}
    with pytest.raises(RuntimeError):
        with atomic_directory(str(tmp_path / "created"), merge=True):
            raise RuntimeError("unreadable image")
    assert _listing(tmp_path) == ["predictions"]  # the folder made for it is gone again


def test_remove_temporaries_removes_only_the_targets_own(tmp_path):
    for name in (".train.tmp-1-ab", ".train.stale-2-cd", ".val.tmp-3-ef", "train"):
        (tmp_path / name).mkdir()
    (tmp_path / ".train.tmp-4").write_text("a file")
    remove_temporaries(str(tmp_path / "train"))
    assert _listing(tmp_path) == [".val.tmp-3-ef", "train"]
