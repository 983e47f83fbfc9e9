"""train_net.py's processes, run as a user runs them: SIGTERM / Ctrl-C stop after the step with a
checkpoint (exit 143 / 130) and ``--resume`` continues bit-exactly; workers die with a killed
launcher; one run per OUTPUT_DIR; runs share a machine without port clashes; two machines on one
host and torchrun train as one process does.

The model is :class:`~tests.helpers.tiny_detection.TinyTestNet` (GroupNorm, batch-mean loss): two
processes with 2 images each train as one process with 4. Runs pause at a chosen iteration (the
driver's ``HOLD_AT_ITER``: each process writes its pid to ``HOLD_DIR/rank<r>`` when that step
starts and waits for ``HOLD_DIR/go``), so signals arrive mid-step at a known iteration, whatever
the machine's load. Multi-process runs are costly (each process imports the stack), so one
scenario covers several behaviours; single-process runs go through ``train_net.cli`` in-process.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from san_det.engine.output_lock import LOCK_FILE_NAME
from tests.helpers.coco_files import register_coco_dataset, simple_images
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import process_alive, wait_until
from tests.helpers.scripts import child_env, load_script
from tests.helpers.tiny_detection import tiny_test_net_cfg

pytestmark = pytest.mark.slow

TIMEOUT = 900  # generous: CI machines are slow and shared
MAX_ITER = 8

_DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
import san_det
import tests.helpers.tiny_detection  # registers TinyTestNet
from tests.helpers.coco_files import register_coco_dataset
register_coco_dataset("proc_train", {folder!r})

hold_at = os.environ.get("HOLD_AT_ITER")
if hold_at is not None:
    from detectron2.utils import comm
    from san_det.engine.trainer import RobustTrainer

    real_run_step = RobustTrainer.run_step

    def run_step(self):
        if self.iter == int(hold_at):
            hold = os.environ["HOLD_DIR"]
            marker = os.path.join(hold, "rank%d" % comm.get_rank())
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            deadline = time.monotonic() + 900
            while not os.path.exists(os.path.join(hold, "go")) and time.monotonic() < deadline:
                time.sleep(0.05)
        real_run_step(self)

    RobustTrainer.run_step = run_step

import train_net
if __name__ == "__main__":
    train_net.cli(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The driver script and the config: TinyTestNet, 4 images per step in total."""
    root = tmp_path_factory.mktemp("procs")
    folder = root / "data"
    register_coco_dataset("proc_train", str(folder), simple_images(12, seed=2))
    (root / "driver.py").write_text(_DRIVER.format(root=str(REPO_ROOT), folder=str(folder)))
    cfg = tiny_test_net_cfg("unused", ("proc_train",), MAX_ITER, norm="GN")
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.DATALOADER.NUM_WORKERS = 1
    cfg.SEED = 7
    (root / "testnet.yaml").write_text(cfg.dump())
    return root


class Run:
    """A train_net.py process, in its own session (as a job of a shell with job control)."""

    count = 0

    def __init__(self, inputs, out, *args, hold_at=None, launcher=None):
        Run.count += 1
        self.out, self.hold = Path(out), Path(f"{out}.hold{Run.count}")
        self.log = Path(f"{out}.{Run.count}.log")
        env = child_env()
        if hold_at is not None:
            self.hold.mkdir()
            env.update(HOLD_AT_ITER=str(hold_at), HOLD_DIR=str(self.hold))
        command = (launcher or [sys.executable]) + [
            str(inputs / "driver.py"),
            "--config-file",
            str(inputs / "testnet.yaml"),
            *args,
            "OUTPUT_DIR",
            str(out),
        ]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_at_hold(self, ranks=2):
        """Wait until every rank is in the held step; returns their pids."""
        markers = [self.hold / f"rank{r}" for r in range(ranks)]
        ok = wait_until(
            lambda: all(m.exists() for m in markers) or self.proc.poll() is not None,
            timeout=TIMEOUT,
        )
        assert ok and self.proc.poll() is None, self.output()[-3000:]
        return [int(m.read_text()) for m in markers]

    def release(self):
        (self.hold / "go").write_text("")

    def wait(self):
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self):
        return self.log.read_text()


def _finish(run):
    rc = run.wait()
    assert rc == 0, run.output()[-3000:]
    return run


def _weights(out, name="model_final.pth"):
    return torch.load(Path(out) / name, map_location="cpu", weights_only=False)["model"]


def _assert_bit_exact(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_close(a, b):
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def _stop_lines(output):
    return [line for line in output.splitlines() if line.startswith("train_net.py: stopped")]


def _snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(inputs):
    """One process with the whole batch (in this process, through train_net.cli)."""
    out = inputs / "one"
    load_script("train_net.py").cli(
        ["--config-file", str(inputs / "testnet.yaml"), "OUTPUT_DIR", str(out)]
    )
    weights = _weights(out)
    trained = weights["conv.weight"] - _weights(out, "model_0000001.pth")["conv.weight"]
    assert trained.abs().max() > 1e-4  # it trained on after iteration 1
    return weights


@pytest.fixture(scope="module")
def two_machines(inputs):
    """--num-machines 2 --machine-rank 0/1 on this host: two launchers, one process each."""
    out, url = inputs / "machines", f"tcp://127.0.0.1:{_free_port()}"
    runs = [
        Run(
            inputs,
            out,
            "--num-machines",
            "2",
            "--machine-rank",
            str(rank),
            "--num-processes",
            "1",
            "--dist-url",
            url,
        )
        for rank in (0, 1)
    ]
    for run in runs:
        _finish(run)
    assert "Rank of current process: 0. World size: 2" in (out / "log.txt").read_text()
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    return _weights(out)


def test_two_machines_and_torchrun_train_as_one_process(inputs, one_process, two_machines):
    _assert_close(two_machines, one_process)
    out = inputs / "torchrun"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    _finish(Run(inputs, out, launcher=torchrun))  # env:// rendezvous: nothing spawned
    assert "Rank of current process: 0. World size: 2" in (out / "log.txt").read_text()
    _assert_close(_weights(out), one_process)
    _assert_bit_exact(_weights(out), two_machines)  # the same two processes' arithmetic


def test_stop_kill_lock_and_resume_two_processes(inputs, two_machines, capsys):
    """One run, stopped twice, resumed twice, against an uninterrupted two-process run.

    1. Held in iteration 2: a second run into its OUTPUT_DIR is refused in one line (exit 2),
       writing nothing. SIGTERM to rank 1 only: both ranks stop after iteration 2 (they agree
       through an all-reduce), checkpoint, exit status 143.
    2. --resume, held in iteration 5 (last checkpoint: iteration 3). Meanwhile another
       two-process run on the default --dist-url trains on this machine too, and is stopped by
       Ctrl-C (SIGINT to its whole process group, data-loader workers included): status 130.
       Then SIGKILL of the resumed run's launcher: its workers end with it.
    3. --resume takes over the lock of the killed run and trains to the end: the final weights
       are those of the uninterrupted run, bit for bit. --eval-only into the finished folder
       is not refused.
    """
    train_net = load_script("train_net.py")
    out = inputs / "run"

    # 1.
    first = Run(inputs, out, "--num-processes", "2", hold_at=2)
    pids = first.wait_at_hold()
    before = _snapshot(out)
    with pytest.raises(SystemExit) as refused:
        train_net.cli(
            [
                "--config-file",
                str(inputs / "testnet.yaml"),
                "--num-processes",
                "2",
                "OUTPUT_DIR",
                str(out),
            ]
        )
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train_net.py: error: OUTPUT_DIR {out} is in use")
    assert f"pid {first.proc.pid}" in err[0], err
    assert _snapshot(out) == before
    os.kill(pids[1], signal.SIGTERM)
    first.release()
    assert first.wait() == 143, first.output()[-3000:]
    lines = _stop_lines(first.output())
    assert len(lines) == 1, first.output()[-3000:]
    assert "stopped by SIGTERM after iteration 2" in lines[0] and "--resume" in lines[0]
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert "Traceback" not in first.output() and not list(out.glob(".*.tmp-*"))
    assert torch.load(out / "model_0000002.pth", weights_only=False)["iteration"] == 2

    # 2. (no data-loader workers: they would hold the lock for seconds after their parent died)
    second = Run(
        inputs, out, "--num-processes", "2", "--resume", "DATALOADER.NUM_WORKERS", "0", hold_at=5
    )
    workers = second.wait_at_hold()
    other = Run(inputs, inputs / "other", "--num-processes", "2", hold_at=1)
    other.wait_at_hold()
    os.killpg(other.proc.pid, signal.SIGINT)
    other.release()
    assert other.wait() == 130, other.output()[-3000:]
    lines = _stop_lines(other.output())
    assert len(lines) == 1 and "stopped by SIGINT after iteration 1" in lines[0], lines
    assert (inputs / "other" / "last_checkpoint").read_text() == "model_0000001.pth"
    assert "Traceback" not in other.output()
    os.kill(second.proc.pid, signal.SIGKILL)
    try:
        assert wait_until(lambda: not any(process_alive(p) for p in workers), timeout=TIMEOUT)
    finally:
        second.kill()
    assert "Starting training from iteration 3" in (out / "log.txt").read_text()
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert (out / LOCK_FILE_NAME).read_text()  # the killed launcher could not erase its record

    # 3.
    third = _finish(Run(inputs, out, "--num-processes", "2", "--resume"))
    assert "Taking over" in third.output() and f"pid {second.proc.pid}" in third.output()
    assert "Starting training from iteration 4" in (out / "log.txt").read_text()
    assert (out / LOCK_FILE_NAME).read_text() == ""
    _assert_bit_exact(_weights(out), two_machines)
    train_net.cli(
        [
            "--config-file",
            str(inputs / "testnet.yaml"),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "OUTPUT_DIR",
            str(out),
        ]
    )
