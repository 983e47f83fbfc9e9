"""Worker processes that do not outlive the process that started them.

``torch.multiprocessing.spawn`` asks Linux to send its workers SIGINT when their parent dies
(``prctl(PR_SET_PDEATHSIG, SIGINT)``). A launcher started in the background by a shell (``cmd &``,
job schedulers, ``nohup``) runs with SIGINT ignored, its workers inherit that, and so killing
the launcher (``kill -9``, the OOM killer) left its workers training on as orphans, writing to
OUTPUT_DIR. :func:`exit_with_parent` makes a worker die with its parent instead:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (cannot be ignored or delayed by a main thread
  blocked in C++; the last complete checkpoint stays valid, see :mod:`.checkpoint`);
- elsewhere (or when prctl fails), a daemon thread that polls the parent's pid and ends the
  process with a one-line message when the parent is gone.

Either way the parent may already have died before the worker got here: that is checked too.
"""

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

__all__ = ["EXIT_PARENT_DIED", "exit_with_parent"]

logger = logging.getLogger(__name__)

EXIT_PARENT_DIED = 1

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_gone(parent_pid: int) -> None:
    print(
        f"process {os.getpid()}: the process that started it (pid {parent_pid}) has exited; "
        "stopping",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_PARENT_DIED)


def _watch(parent_pid: int, poll_interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_interval)
    _parent_gone(parent_pid)


def exit_with_parent(parent_pid: int, *, poll_interval: float = 1.0, use_prctl: bool = True) -> str:
    """End this process as soon as its parent ``parent_pid`` has exited.

    Args:
        parent_pid: the pid of this process's parent as the parent saw it (``os.getpid()`` there),
            so that a parent that died before this call is noticed too.
        poll_interval: seconds between checks of the watchdog thread.
        use_prctl: try Linux's parent-death signal first (False: always the watchdog thread).

    Returns:
        ``"prctl"`` or ``"watchdog"``: how the parent is watched.
    """
    if use_prctl and _set_parent_death_signal(signal.SIGKILL):
        how = "prctl"
    else:
        threading.Thread(
            target=_watch, args=(parent_pid, poll_interval), name="parent-watch", daemon=True
        ).start()
        how = "watchdog"
    if os.getppid() != parent_pid:  # died before the signal was armed
        _parent_gone(parent_pid)
    return how
