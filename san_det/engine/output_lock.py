"""One run per output folder: an exclusive lock on ``OUTPUT_DIR/.san_det.lock`` while it runs.

Two runs into one folder would overwrite each other's checkpoints and interleave their logs.
:class:`OutputDirLock` takes an exclusive ``flock`` on the folder's lock file, without waiting:
a second run is refused with :class:`OutputDirInUseError` (naming the holder: pid, host, start
time, command line) before it writes anything. The lock belongs to the kernel, not to the file:
it is released when the last process holding it ends, however it ends (SIGKILL included), so a
lock left by a killed run is simply taken over by the next one (which says so: the killed run
could not erase its record from the lock file, a finished one does).

The launching process takes the lock; the workers it spawns inherit the same open lock
(pickling an :class:`OutputDirLock` for ``multiprocessing``'s spawn passes its file descriptor
on, see :meth:`OutputDirLock.__reduce__`), so the folder stays locked until the last worker of
the run has exited, even if the launcher was killed first. Only the job's first launcher locks
(machine rank 0, or rank 0 under torchrun): the other machines of a job write into the same
folder when it is shared.

Without ``fcntl`` (Windows), or on a file system without ``flock``, runs are not locked (a
warning says so).
"""

import json
import logging
import os
import socket
import sys
import time
from multiprocessing import reduction
from typing import Optional

from ..utils.atomic import pid_alive
from .errors import UserInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_FILE_NAME", "OutputDirInUseError", "OutputDirLock"]

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".san_det.lock"


class OutputDirInUseError(UserInputError):
    """Another run holds the output folder's lock."""


def _describe(record: dict, held: bool = False) -> str:
    if not record:
        return "a run that is ending"
    where = f"pid {record.get('pid')} on {record.get('host')}"
    started = record.get("started", "?")
    command = record.get("command", "")
    text = f"{where}, started {started}" + (f": {command}" if command else "")
    pid = int(record.get("pid", 0))
    if held and record.get("host") == socket.gethostname() and not pid_alive(pid):
        text += " (that process has exited; its workers are stopping)"
    return text


class OutputDirLock:
    """Exclusive, non-blocking lock of an output folder (module docstring).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Remote folders (``s3://``
    and other iopath URLs) and an empty ``output_dir`` are not locked.

    Args:
        output_dir: the run's ``OUTPUT_DIR`` (created when locked).
        option: how the user named the folder, for the messages (``"--output"`` for tools).
    """

    def __init__(self, output_dir: str, option: str = "OUTPUT_DIR"):
        self.output_dir = output_dir
        self.option = option
        self.path = os.path.join(output_dir, LOCK_FILE_NAME) if output_dir else ""
        self._fd: Optional[int] = None
        self._owner = False  # False in workers that inherited the lock

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def _read_record(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
            return json.loads(data) if data else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputDirLock":
        """Take the lock.

        Raises:
            OutputDirInUseError: another run holds it; nothing was written.
            UserInputError: the lock file cannot be opened.
        """
        if not self.path or "://" in self.output_dir or self.locked:
            return self
        if fcntl is None:
            logger.warning(f"No fcntl on this system: {self.output_dir} is not locked")
            return self
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            fd = os.open(self.path, os.O_RDONLY)  # still lockable, but no record
        except OSError as e:
            raise UserInputError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self._read_record(fd), held=True)
            os.close(fd)
            raise OutputDirInUseError(
                f"{self.option} {self.output_dir} is in use by another run ({holder}); wait for "
                f"it to end or pass another {self.option}"
            ) from None
        except OSError as e:  # e.g. a network file system without flock
            os.close(fd)
            logger.warning(f"Cannot lock {self.path} ({e.strerror}): runs into it are not locked")
            return self
        previous = self._read_record(fd)
        if previous:
            logger.warning(
                f"Taking over {self.output_dir} from a run that ended without releasing it "
                f"(killed?): {_describe(previous)}"
            )
        self._fd, self._owner = fd, True
        self._write_record()
        return self

    def _write_record(self) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:
            pass  # opened read-only: the lock holds, the holder is just not named

    def release(self) -> None:
        """Erase the record and close the lock file. The lock is free once every process that
        inherited it has exited too. In an inheriting worker this only closes the descriptor."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._owner:
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __reduce__(self):
        # Only for multiprocessing's spawn: DupFd passes this process's descriptor (the same open
        # file, hence the same lock) on to the child; pickling it anywhere else is refused.
        fd = reduction.DupFd(self._fd) if self._fd is not None else None
        return _inherit_lock, (self.output_dir, fd)


def _inherit_lock(output_dir: str, fd) -> OutputDirLock:
    lock = OutputDirLock(output_dir)
    if fd is not None:
        lock._fd = fd.detach()
    return lock
