"""The repository's scripts run as a user runs them (a child process, in its own session), paused
at a chosen call so that a signal arrives at a known moment, whatever the machine's load.

:class:`HeldRun` starts ``python <driver> <script> args...``. With ``hold_at="module:Name.attr"``
the driver wraps that function: its ``hold_call``-th call (in every process of the run) runs to
its end, then the process writes its pid to ``<hold dir>/<pid>`` and sleeps until
:meth:`HeldRun.release` (or for :data:`HOLD_S` seconds). A signal sent then finds the process in
a plain Python ``time.sleep``, where its handlers run at once.

The child starts with SIGINT at its default, as a job started in a terminal does, even where
pytest itself ignores it (run in the background by a non-interactive shell: ``cmd &``), which the
run would inherit and keep (:mod:`san_det.engine.stop_signals`): Ctrl-C tests would then wait for
a run that never sees the signal.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

from .paths import REPO_ROOT
from .processes import wait_until
from .scripts import child_env

HOLD_S = 120.0
TIMEOUT = 600.0

_DRIVER = """
import importlib, os, runpy, sys, time

hold_at = os.environ.get("HOLD_AT")
if hold_at:
    module_name, _, qualname = hold_at.partition(":")
    owner = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for name in path:
        owner = getattr(owner, name)
    real = getattr(owner, attr)
    calls = [0]

    def held(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(os.environ["HOLD_CALL"]):
            marker = os.path.join(os.environ["HOLD_DIR"], str(os.getpid()))
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            deadline = time.monotonic() + float(os.environ["HOLD_S"])
            go = os.path.join(os.environ["HOLD_DIR"], "go")
            while time.monotonic() < deadline and not os.path.exists(go):
                time.sleep(0.05)
        return result

    setattr(owner, attr, held)

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    if os.path.basename(script) == "train_net.py":  # importable: its workers unpickle train_net.run
        import train_net

        train_net.cli(sys.argv[1:])
    else:
        runpy.run_path(script, run_name="__main__")
"""


def _as_in_a_terminal(preexec_fn=None):
    """A ``preexec_fn``: SIGINT at its default (see the module docstring), then ``preexec_fn``."""

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    return setup


def _processes_of_session(sid: int) -> List[str]:
    """``pid state command`` of the processes still in session ``sid`` (Linux; else [])."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:150]
        except (OSError, ValueError, IndexError):
            continue
        found.append(f"{entry} {fields[0]} {command}")
    return found


class HeldRun:
    """``script`` (relative to the repository) with ``args``, in a child process of its own
    session, output to ``<log_dir>/<n>.log``; paused at ``hold_at`` (see the module docstring).

    Args:
        env: extra environment variables (e.g. ``PYTHONPATH`` of another checkout).
        preexec_fn: run in the child before the script (e.g. to set a resource limit).
    """

    count = 0

    def __init__(
        self,
        log_dir,
        script: str,
        *args: str,
        hold_at: Optional[str] = None,
        hold_call: int = 1,
        env: Optional[dict] = None,
        preexec_fn=None,
    ):
        HeldRun.count += 1
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        driver = log_dir / "driver.py"
        driver.write_text(_DRIVER)
        self.hold = log_dir / f"hold{HeldRun.count}"
        self.hold.mkdir()
        self.log = log_dir / f"{HeldRun.count}.log"
        full_env = child_env(helpers=True, HOLD_DIR=str(self.hold), HOLD_S=str(HOLD_S))
        if hold_at:
            full_env.update(HOLD_AT=hold_at, HOLD_CALL=str(hold_call))
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(driver), str(REPO_ROOT / script), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,  # copied by this process: a child's file size limit spares it
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=_as_in_a_terminal(preexec_fn),
        )
        self._copy = threading.Thread(target=self._copy_output, daemon=True)
        self._copy.start()

    def _copy_output(self) -> None:
        with open(self.log, "wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()

    def wait_held(self, processes: int = 1) -> List[int]:
        """Wait until ``processes`` processes are held; returns their pids."""
        ok = wait_until(
            lambda: len(self._held()) >= processes or self.proc.poll() is not None,
            timeout=TIMEOUT,
        )
        assert ok and self.proc.poll() is None, self.output()[-3000:]
        return self._held()

    def _held(self) -> List[int]:
        return sorted(int(n) for n in os.listdir(self.hold) if n.isdigit())

    def signal_group(self, signum: int) -> None:
        """``signum`` to every process of the run (as Ctrl-C reaches a terminal's job)."""
        os.killpg(self.proc.pid, signum)

    def release(self) -> None:
        """Let held processes go on (e.g. after a signal that only the training loop records)."""
        (self.hold / "go").write_text("")

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status; fails if the run takes longer than ``timeout`` seconds, naming the
        processes still running and the end of the output."""
        try:
            code = self.proc.wait(timeout=timeout)
            self._copy.join(timeout=60)
            return code
        except subprocess.TimeoutExpired:
            running = "\n".join(_processes_of_session(self.proc.pid))
            raise AssertionError(
                f"the run has not exited within {timeout} s; still running (pid state command):"
                f"\n{running}\noutput:\n{self.output()[-3000:]}"
            ) from None
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()

    def assert_only_line(self, prefix: str, expected: str) -> None:
        """Of the output's lines, ``expected`` is the only one starting with ``prefix``, and there
        is no traceback."""
        lines = [line for line in self.output().splitlines() if line.startswith(prefix)]
        assert lines == [expected], self.output()[-3000:]
        assert "Traceback" not in self.output()
