"""Stop training cleanly on SIGTERM / SIGINT: finish the step, checkpoint, exit 143 / 130.

:class:`StopOnSignalHook` holds :class:`~san_det.engine.stop_signals.StopSignals` for the
training loop. After every step all processes agree (an all-reduce of the signal number, as the
NaN guard agrees on non-finite losses) on whether any of them received a signal, so every rank
stops after the same iteration. Then the main process writes ``model_<iteration>.pth`` (atomically,
through the trainer's checkpointer), every process waits for it and raises
:class:`TrainingStopped`, ignoring further signals until it exits
(:func:`~.stop_signals.begin_stopping`): ``--resume`` continues at the next iteration, exactly as
from a periodic checkpoint (bit-exactly on the CPU with ``SEED`` >= 0).

A signal during the last iteration lets training write its final checkpoint, then stops before
the final evaluation; a signal during an evaluation stops it at once
(:mod:`.eval_interrupt`); one before the loop starts has the signal's usual effect.
"""

import logging
import os

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from .interrupt import Interrupted, signal_name
from .stop_signals import StopSignals, begin_stopping

__all__ = ["StopOnSignalHook", "TrainingStopped"]

logger = logging.getLogger(__name__)


class TrainingStopped(Interrupted):
    """Training stopped on a signal after a complete step, whose checkpoint was written.

    An :class:`~.interrupt.Interrupted` (``SystemExit`` with code ``128 + signum``: 143 for
    SIGTERM, 130 for SIGINT).
    """

    def __init__(self, signum: int, iteration: int, checkpoint: str):
        super().__init__(
            signum,
            f"stopped by {signal_name(signum)} after iteration {iteration}; checkpoint "
            f"{checkpoint} written, continue with --resume",
        )
        self.iteration = int(iteration)
        self.checkpoint = checkpoint


def _max_over_processes(value: int) -> int:
    if comm.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopOnSignalHook(HookBase):
    """Stop after the step during which any process received SIGTERM or SIGINT (module docstring).

    Register it on every process, after the other hooks (its ``after_step`` then runs after the
    learning-rate step and any periodic checkpoint or evaluation of the iteration). The trainer
    must have a ``checkpointer`` (:class:`~san_det.engine.checkpoint.SafeCheckpointer`).
    """

    def __init__(self):
        self._signals = StopSignals()

    def before_train(self):
        self._signals.__enter__()

    def after_train(self):
        self._signals.__exit__(None, None, None)

    def after_step(self):
        signum = _max_over_processes(self._signals.received or 0)
        if not signum:
            return
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            logger.warning(
                f"{signal_name(signum)} during the last iteration: writing the final checkpoint"
            )
            return
        name = f"model_{iteration:07d}"
        checkpointer = self.trainer.checkpointer
        checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # the checkpoint is complete before any process exits
        path = os.path.join(checkpointer.save_dir, f"{name}.pth")
        stopped = TrainingStopped(signum, iteration, path)
        logger.warning(str(stopped))
        begin_stopping()  # a late copy of the signal (Ctrl-C twice, the launcher's) is ignored
        raise stopped
