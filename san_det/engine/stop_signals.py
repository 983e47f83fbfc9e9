"""Stop requests by signal: SIGTERM (a preempted cluster job, ``kill``) and SIGINT (Ctrl-C).

:class:`StopSignals` is a context manager that, while active, replaces the handlers of both
signals by one that records the first signal (:attr:`StopSignals.received`) instead of ending
the process, and optionally passes every such signal on to child processes (a launcher forwards
them to its workers). What to do about a request is the caller's: the training loop finishes its
step and writes a checkpoint (:mod:`.graceful_stop`); a launcher waits for its workers.

Data-loader workers get these signals too when they reach a whole process group (Ctrl-C in a
terminal, a cluster preempting a job) and would die of them, failing the step in progress: they
ignore them (:func:`shielded_worker_init`, a ``worker_init_fn``). Their parent ends them as
usual (the loader's shutdown message, or torch's parent watchdog when the parent is gone); at the
parent's exit, where ``multiprocessing`` would send its daemonic children (the workers) SIGTERM
and wait for them, they are sent SIGKILL first.

A signal that is ignored when the block starts (SIGINT of a job started in the background by a
shell) stays ignored. Handlers can only be set in the main thread; elsewhere the block does
nothing. Receiving a signal again changes nothing (Ctrl-C reaches a launcher and its workers at
once, and the launcher forwards it once more); SIGKILL ends a run at once.

A process that has begun to stop on a signal (:func:`begin_stopping`: an evaluation stopped at
once, training stopped after its step) ignores both signals from then on until it exits: blocks
that end while it unwinds leave them ignored instead of restoring the handlers they replaced.
A copy of the signal that arrives late (the launcher's, when the launcher ran after its workers
had left their blocks; Ctrl-C pressed twice) would otherwise meet Python's default handlers and
break the clean-up at any point: a ``KeyboardInterrupt`` in the middle of writing the
checkpoint, a traceback at exit, or death by SIGTERM.
"""

import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
from typing import Callable, Dict, Iterable, Optional

__all__ = [
    "STOP_SIGNALS",
    "StopSignals",
    "begin_stopping",
    "exit_status",
    "ignore_stop_signals_in_worker",
    "pending_stop_signal",
    "restore_handlers",
    "shield_loader_workers",
    "shielded_worker_init",
    "stopping",
]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


_active_blocks = []  # the StopSignals blocks in effect, innermost last
# begin_stopping() was called: the process is on its way out. A plain flag, not a
# threading.Event: signal handlers read and set it, and a handler can be entered again while it
# runs (a second signal is handled at the next bytecode, even inside the first handler), where a
# lock (Event.set takes one) would be acquired twice by the same thread and never released.
_stopping = False


def begin_stopping() -> None:
    """Mark this process as stopping on a signal: SIGTERM and SIGINT are ignored from now on, until
    it exits (see the module docstring). Call it where the stop is decided (the handler that
    raises, the hook that ends training); safe in a signal handler (no lock). Ignoring takes
    effect in the main thread only (elsewhere handlers cannot be changed)."""
    global _stopping
    _stopping = True
    for signum in STOP_SIGNALS:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            break


def stopping() -> bool:
    """Whether :func:`begin_stopping` was called in this process."""
    return _stopping


def restore_handlers(previous: Dict[int, object]) -> None:
    """Put back the handlers of ``previous`` (signal number: handler, as ``signal.getsignal``
    returned it), unless the process is :func:`stopping`: then the signals stay ignored."""
    if stopping():
        return
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def pending_stop_signal() -> Optional[int]:
    """The signal recorded by the innermost active :class:`StopSignals` block, or None."""
    for block in reversed(_active_blocks):
        if block.received is not None:
            return block.received
    return None


def exit_status(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


class StopSignals:
    """Record (and optionally forward) SIGTERM/SIGINT while the ``with`` block runs.

    Args:
        forward_to: called in the handler; returns the pids to pass each signal on to (pids that
            no longer exist are skipped).
    """

    def __init__(self, forward_to: Optional[Callable[[], Iterable[int]]] = None):
        self.received: Optional[int] = None
        self._forward_to = forward_to
        self._previous: Dict[int, object] = {}

    @property
    def active(self) -> bool:
        """Whether this block's handlers are installed."""
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        self.forward(signum)

    def forward(self, signum: int) -> None:
        """Pass ``signum`` on to the processes of ``forward_to`` (if given)."""
        for pid in self._forward_to() if self._forward_to else ():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current == signal.SIG_IGN:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._handle)
        _active_blocks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        restore_handlers(self._previous)
        self._previous.clear()
        if self in _active_blocks:
            _active_blocks.remove(self)


def ignore_stop_signals_in_worker(worker_id: int = 0, worker_init_fn: Optional[Callable] = None):
    """A data-loader ``worker_init_fn``: ignore SIGTERM and SIGINT, then call ``worker_init_fn``.
    Use :func:`shielded_worker_init` to get one: the workers' parent must kill them at exit."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_kill_at_exit = threading.Lock()
_kill_at_exit_registered = False


def shielded_worker_init(worker_init_fn: Optional[Callable] = None) -> Callable:
    """A ``worker_init_fn`` for loaders created in this process whose workers ignore SIGTERM and
    SIGINT, then run ``worker_init_fn``. Also arranges for this process to SIGKILL its daemonic
    children (the workers) when it exits, before ``multiprocessing`` would SIGTERM and join them."""
    global _kill_at_exit_registered
    with _kill_at_exit:
        if not _kill_at_exit_registered:
            # priority >= 0: multiprocessing runs it before terminating and joining children
            multiprocessing.util.Finalize(None, _kill_daemonic_children, exitpriority=100)
            _kill_at_exit_registered = True
    return functools.partial(ignore_stop_signals_in_worker, worker_init_fn=worker_init_fn)


def shield_loader_workers(loader):
    """Make the workers of ``loader`` (a torch ``DataLoader``) ignore SIGTERM/SIGINT, keeping its
    own ``worker_init_fn`` (:func:`shielded_worker_init`). Returns ``loader``."""
    loader.worker_init_fn = shielded_worker_init(loader.worker_init_fn)
    return loader
