"""Evaluations during training that stop at once on SIGTERM / SIGINT, and are re-run on resume.

detectron2's ``EvalHook`` runs the evaluation inside the training loop's hooks, where the
training loop's signal handlers only record a signal (the step is finished first,
:mod:`.graceful_stop`): an evaluation ran to its end however often it was interrupted.
:class:`InterruptibleEvalHook` wraps an ``EvalHook`` (``RobustTrainer.build_hooks`` wraps every
one) so that its evaluations run :func:`~.interrupt.interruptible`: the first signal, or one
received during the step before, stops the evaluation at once with :class:`~.interrupt.Interrupted`.
The trainer then (:func:`evaluation_interrupted`):

- after a periodic evaluation of iteration ``k``: the main process writes ``model_<k>.pth``
  recording that the evaluation of ``k`` is pending; ``--resume`` runs it first
  (:meth:`InterruptibleEvalHook.before_train`), then continues at ``k + 1``;
- after the final evaluation: ``model_final.pth`` is already complete; ``--resume`` finds no
  iteration left and runs the final evaluation (as detectron2's ``EvalHook`` does after the loop).
"""

import contextlib
import logging
import os

from detectron2.engine import HookBase

from .interrupt import Interrupted, interruptible, signal_name

__all__ = ["EvaluationInterrupted", "InterruptibleEvalHook", "evaluation_interrupted"]

logger = logging.getLogger(__name__)

#: The trainer attribute (and checkpoint entry of its state) naming the iteration whose
#: evaluation was interrupted, or None.
PENDING_EVALUATION = "interrupted_evaluation_iter"


class EvaluationInterrupted(Interrupted):
    """An evaluation of the training loop was stopped by a signal."""


@contextlib.contextmanager
def _evaluation(during: str):
    try:
        with interruptible(during):
            yield
    except EvaluationInterrupted:
        raise
    except Interrupted as e:
        raise EvaluationInterrupted(e.signum, str(e), e.when) from None


class InterruptibleEvalHook(HookBase):
    """Runs a detectron2 ``EvalHook`` (``hook``) inside :func:`~.interrupt.interruptible`, and
    re-runs its evaluation before training resumes when the checkpoint says it was interrupted.

    Args:
        hook: the ``EvalHook``; it shares this hook's ``trainer``.
        period: its evaluation period (``TEST.EVAL_PERIOD``): a signal received before a step
            stops the evaluation after that step only when there is one.
    """

    def __init__(self, hook: HookBase, period: int):
        self._hook = hook
        self._period = period

    @property
    def trainer(self):
        return self._hook.trainer

    @trainer.setter
    def trainer(self, trainer):
        self._hook.trainer = trainer

    def before_train(self):
        pending = getattr(self.trainer, PENDING_EVALUATION, None)
        if pending is not None and pending == self.trainer.start_iter - 1:
            logger.info(f"Running the evaluation of iteration {pending}, interrupted by a signal")
            with _evaluation(f"the evaluation of iteration {pending}"):
                self._hook._do_eval()  # EvalHook's evaluation, as after_step runs it
        self._hook.before_train()

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period <= 0 or next_iter % self._period or next_iter == self.trainer.max_iter:
            return self._hook.after_step()  # no evaluation after this step (as EvalHook decides)
        with _evaluation(f"the evaluation after iteration {self.trainer.iter}"):
            self._hook.after_step()

    def after_train(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            return self._hook.after_train()  # training failed or stopped: no final evaluation
        with _evaluation("the final evaluation"):
            self._hook.after_train()

    def before_step(self):
        self._hook.before_step()

    def after_backward(self):
        self._hook.after_backward()

    def state_dict(self):
        return self._hook.state_dict()


def evaluation_interrupted(trainer, error: EvaluationInterrupted) -> Interrupted:
    """What ``trainer`` (a :class:`~.trainer.RobustTrainer` whose training loop raised ``error``
    from an evaluation) leaves behind, as the :class:`Interrupted` to raise (see the module
    docstring). Every process calls it; only the main process writes the checkpoint."""
    name = signal_name(error.signum)
    checkpointer = trainer.checkpointer
    if trainer.iter >= trainer.max_iter:  # the loop had ended: the final evaluation
        last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else "none"
        return Interrupted(
            error.signum,
            f"stopped by {name} {error.when} the final evaluation; {last} is complete, "
            "--resume runs the evaluation",
        )
    iteration = trainer.iter
    setattr(trainer, PENDING_EVALUATION, iteration)
    name_k = f"model_{iteration:07d}"
    checkpointer.save(name_k, iteration=iteration)  # the main process only (save_to_disk)
    path = os.path.join(checkpointer.save_dir, f"{name_k}.pth")
    return Interrupted(
        error.signum,
        f"stopped by {name} {error.when} the evaluation after iteration {iteration}; checkpoint "
        f"{path} written, --resume runs that evaluation and continues",
    )
