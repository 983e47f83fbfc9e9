"""Stop at once on SIGTERM / SIGINT where there is no step to finish: evaluation, prediction,
checkpoint conversion.

Training finishes its step before it stops (:mod:`.graceful_stop`); an evaluation, a prediction
run or a conversion has nothing worth finishing, so inside :func:`interruptible` the first
SIGTERM or SIGINT raises :class:`Interrupted` (a ``SystemExit`` with status 143 / 130) in the
main thread as soon as Python runs again (after the current operator: seconds at most). The
exception unwinds through the writers, which remove their temporary files and staging folders
(:mod:`san_det.utils.atomic`), so nothing partial is left under a final name. Further signals
are ignored until the process exits (:func:`~.stop_signals.begin_stopping`), so that this
clean-up completes (Ctrl-C twice stops just as once; so does the copy a launcher forwards to its
workers, however late it arrives); SIGKILL still ends a process at once (its temporaries are
removed by the next run).

A signal that a surrounding :class:`~.stop_signals.StopSignals` block (the training loop)
recorded before the ``interruptible`` block starts is honoured on entry: a run asked to stop
during its last step does not start the final evaluation.
"""

import contextlib
import signal
import threading
from typing import Iterator

from .stop_signals import (
    STOP_SIGNALS,
    begin_stopping,
    exit_status,
    pending_stop_signal,
    restore_handlers,
    stopping,
)

__all__ = ["Interrupted", "interruptible", "signal_name"]


def signal_name(signum: int) -> str:
    """``"SIGTERM"``, ``"SIGINT"``, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(SystemExit):
    """The run was stopped by ``signum``; ``str()`` is the one line to report.

    A ``SystemExit`` with code ``128 + signum``: uncaught, it ends the process with the status a
    shell expects of a process stopped by that signal.
    """

    def __init__(self, signum: int, message: str, when: str = "during"):
        super().__init__(exit_status(signum))
        self.signum = int(signum)
        self.message = message
        self.when = when  # "during" the interrupted work, or "before" it started

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def interruptible(during: str) -> Iterator[None]:
    """Within the block, SIGTERM / SIGINT raise :class:`Interrupted` ("stopped by SIGINT during
    ``during``"). Only in the main thread (elsewhere the block changes nothing); a signal ignored
    when the block starts stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = pending_stop_signal()
    if pending is not None:
        begin_stopping()
        raise Interrupted(pending, f"stopped by {signal_name(pending)} before {during}", "before")

    def handle(signum, frame):
        if stopping():
            return  # a copy that arrived while this handler ran (handlers nest): ignored
        begin_stopping()  # further signals are ignored: the clean-up runs to its end
        raise Interrupted(signum, f"stopped by {signal_name(signum)} during {during}")

    previous = {}
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handle)
    try:
        yield
    finally:
        restore_handlers(previous)
