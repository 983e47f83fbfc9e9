"""The process machinery on its own: workers die with their parent (prctl and the portable
watchdog), stop signals are recorded and forwarded, the output-folder lock refuses a second
holder, survives SIGKILL of its holder as a free lock, and is shared with spawned workers."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from san_det.engine.output_lock import LOCK_FILE_NAME, OutputDirInUseError, OutputDirLock
from san_det.engine.stop_signals import StopSignals, exit_status
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import process_alive as alive
from tests.helpers.processes import wait_until
from tests.helpers.scripts import load_script

PARENT_WATCH = REPO_ROOT / "san_det" / "engine" / "parent_watch.py"
STOP_SIGNALS = REPO_ROOT / "san_det" / "engine" / "stop_signals.py"
LINUX = sys.platform.startswith("linux")


# A parent that starts a child which watches it, prints the child's pid, then sleeps. The child
# loads parent_watch.py by path (stdlib only): no torch import, so this is fast.
_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
    print(child.pid, flush=True)
    time.sleep(600)
    """)
_CHILD = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("parent_watch", sys.argv[1])
    parent_watch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parent_watch)
    how = parent_watch.exit_with_parent(
        os.getppid(), poll_interval=0.05, use_prctl=sys.argv[2] == "prctl")
    assert how == sys.argv[2], how
    time.sleep(600)
    """)


@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_child_exits_when_its_parent_is_killed(how):
    if how == "prctl" and not LINUX:
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD, str(PARENT_WATCH), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # the child is watching (or about to: then it sees the parent gone)
        assert alive(child)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not alive(child)), f"child {child} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
    if how == "watchdog":
        assert "has exited; stopping" in parent.stderr.read()


def test_stop_signals_record_restore_and_respect_ignored_signals():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.active
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: stop.received is not None, timeout=10)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
        time.sleep(0.05)
    assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGINT) == 130

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a background job's
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stop_signals_forward_to_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with StopSignals(forward_to=lambda: [child.pid]) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert child.wait(timeout=60) == -signal.SIGTERM
        assert stop.received == signal.SIGTERM
    finally:
        child.kill()
        child.wait()


# interrupt.py and stop_signals.py loaded as a package of their own (stdlib only, no torch
# import), from the folder given as the script's first argument.
_LOAD_ENGINE = textwrap.dedent("""
    import importlib, os, signal, sys, time, types
    package = types.ModuleType("engine")
    package.__path__ = [sys.argv[1]]
    sys.modules["engine"] = package
    interrupt = importlib.import_module("engine.interrupt")
    stop_signals = importlib.import_module("engine.stop_signals")
    """)


# A worker interrupted during an evaluation (interruptible inside the training loop's StopSignals
# block), whose copy of the signal forwarded by the launcher arrives only after the training loop
# has ended its block (the launcher was slow to run): that copy must not end the clean-up. Loads
# interrupt.py and stop_signals.py as a package of their own (stdlib only, no torch import).
_FORWARDED_LATE = _LOAD_ENGINE + textwrap.dedent("""
    signum = getattr(signal, sys.argv[2])

    training_loop = stop_signals.StopSignals()  # StopOnSignalHook: before_train ... after_train
    training_loop.__enter__()
    try:
        with interrupt.interruptible("the evaluation"):
            os.kill(os.getpid(), signum)  # Ctrl-C / kill reaching the worker
            time.sleep(60)
    except interrupt.Interrupted as e:
        stopped = e
    training_loop.__exit__(None, None, None)
    os.kill(os.getpid(), signum)  # the launcher's copy
    time.sleep(0.1)
    print(stopped, flush=True)  # the clean-up goes on: the one line, the status of the signal
    sys.exit(stopped.code)
    """)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopping_process_ignores_a_signal_forwarded_after_its_blocks_ended(signum):
    proc = subprocess.run(
        [sys.executable, "-c", _FORWARDED_LATE, str(STOP_SIGNALS.parent), signum.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == exit_status(signum), proc.stderr[-3000:]
    assert proc.stdout == f"stopped by {signum.name} during the evaluation\n"
    assert "Traceback" not in proc.stderr


# The same, with the copy sent at the ``at_line``-th line that Python runs after the first signal
# (a line tracer), so that it lands in turn on every line of the stop: inside the first signal's
# handler (handlers nest: the copy is handled at the next bytecode, even there), while the blocks
# put their handlers back, after they have ended.
_SECOND_SIGNAL = _LOAD_ENGINE + textwrap.dedent("""
    signum, at_line = getattr(signal, sys.argv[2]), int(sys.argv[3])
    lines = 0

    def send_the_copy(frame, event, arg):
        global lines
        if event == "line":
            lines += 1
            if lines == at_line:
                os.kill(os.getpid(), signum)
        return send_the_copy

    training_loop = stop_signals.StopSignals()  # StopOnSignalHook: before_train ... after_train
    training_loop.__enter__()
    try:
        with interrupt.interruptible("the evaluation"):
            sys._getframe().f_trace = send_the_copy
            sys.settrace(send_the_copy)
            os.kill(os.getpid(), signum)  # the first signal
            time.sleep(60)
    except interrupt.Interrupted as e:
        stopped = e
    training_loop.__exit__(None, None, None)
    for _ in range(3):  # the rest of the clean-up
        time.sleep(0.01)
    sys.settrace(None)
    print(stopped, "/", "sent" if lines >= at_line else "not sent", flush=True)
    sys.exit(stopped.code)
    """)


@pytest.mark.slow  # a Python process per line of the stop (about 120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_wherever_it_lands_in_the_stop_changes_nothing(signum):
    sent = "sent"
    at_line = 0
    while sent == "sent":
        at_line += 1
        assert at_line < 500, "the stop runs more lines than expected"
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _SECOND_SIGNAL, str(STOP_SIGNALS.parent), signum.name,
                 str(at_line)],
                capture_output=True,
                text=True,
                timeout=30,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            proc = None  # killed by subprocess.run
        assert proc is not None, f"a second {signum.name} at line {at_line}: no exit within 30 s"
        where = f"a second {signum.name} at line {at_line}: {proc.stderr[-2000:]}"
        assert proc.returncode == exit_status(signum), where
        line, sent = proc.stdout.strip().split(" / ")
        assert line == f"stopped by {signum.name} during the evaluation", where
        assert "Traceback" not in proc.stderr, where
    assert at_line > 10  # the copy landed on every line of the stop, then after it


# A data loader whose worker ignores stop signals; the iterator stays referenced until the
# interpreter exits, where multiprocessing would SIGTERM (ignored) and join the worker forever.
_SHIELDED_LOADER = textwrap.dedent("""
    import importlib.util, os, signal, sys, time
    import torch
    spec = importlib.util.spec_from_file_location("stop_signals", sys.argv[1])
    stop_signals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stop_signals)

    class Counting(torch.utils.data.IterableDataset):
        def __iter__(self):
            i = 0
            while True:
                yield i
                i += 1

    loader = torch.utils.data.DataLoader(
        Counting(), batch_size=None, num_workers=1,
        worker_init_fn=stop_signals.shielded_worker_init())
    it = iter(loader)
    assert next(it) == 0
    worker = it._workers[0].pid
    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGINT)
    time.sleep(1)
    assert [next(it) for _ in range(3)] == [1, 2, 3]  # the worker lives on
    print(worker, flush=True)
    """)


@pytest.mark.slow
def test_shielded_loader_workers_ignore_stop_signals_and_do_not_block_exit():
    proc = subprocess.run(
        [sys.executable, "-c", _SHIELDED_LOADER, str(STOP_SIGNALS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = int(proc.stdout.split()[-1])
    assert wait_until(lambda: not alive(worker), timeout=60)


def test_lock_refuses_a_second_holder_and_is_free_after_release(tmp_path):
    out = tmp_path / "out"
    with OutputDirLock(str(out)) as first:
        assert first.locked and (out / LOCK_FILE_NAME).is_file()
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE_NAME).read_text()
        with pytest.raises(OutputDirInUseError) as info:
            OutputDirLock(str(out)).acquire()
        message = str(info.value)
        assert str(out) in message and f"pid {os.getpid()}" in message
    assert (out / LOCK_FILE_NAME).read_text() == ""  # a clean release erases the record
    with OutputDirLock(str(out)) as second:
        assert second.locked
    assert not OutputDirLock("").acquire().locked  # no folder: nothing to lock
    assert not OutputDirLock("s3://bucket/run").acquire().locked


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from san_det.engine.output_lock import OutputDirLock
    OutputDirLock(sys.argv[2]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """)


@pytest.mark.slow
def test_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(REPO_ROOT), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            OutputDirLock(str(out)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="san_det.engine.output_lock"):
        lock = OutputDirLock(str(out)).acquire()
    try:
        assert lock.locked
        assert "Taking over" in caplog.text and f"pid {holder.pid}" in caplog.text
    finally:
        lock.release()


def _hold_inherited_lock(rank, lock, ready_dir):
    assert lock.locked  # the launcher's open lock file, passed on by spawn
    Path(ready_dir, str(rank)).write_text(str(os.getpid()))
    time.sleep(600)


@pytest.mark.slow
def test_spawned_workers_hold_the_launchers_lock(tmp_path):
    """The folder stays locked while a worker lives, even after the launcher let go of it."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    ready.mkdir()
    lock = OutputDirLock(str(out)).acquire()
    context = mp.start_processes(
        _hold_inherited_lock, args=(lock, str(ready)), nprocs=1, join=False, start_method="spawn"
    )
    try:
        assert wait_until(lambda: (ready / "0").exists())
        lock.release()  # as a launcher killed with SIGKILL would
        with pytest.raises(OutputDirInUseError):
            OutputDirLock(str(out)).acquire()
    finally:
        for process in context.processes:
            process.kill()
            process.join()
    with OutputDirLock(str(out)) as again:
        assert again.locked


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-machines", "2"], "--num-machines 2 needs --dist-url tcp://"),
        (
            ["--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://127.0.0.1:1"],
            "--machine-rank must be in [0, 1], got 2",
        ),
        (["--num-machines", "0"], "--num-machines must be >= 1, got 0"),
    ],
)
def test_train_net_refuses_bad_machine_arguments(tmp_path, capsys, args, message):
    config = REPO_ROOT / "configs" / "COCO-Detection" / "retinanet_R_50_FPN_1x.yaml"
    out = tmp_path / "out"
    overrides = ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    with pytest.raises(SystemExit) as info:
        load_script("train_net.py").cli(
            ["--config-file", str(config), *args, *overrides, "OUTPUT_DIR", str(out)]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_net.py: error: ") and message in err[0], err
    assert not out.exists()
