"""The NaN/inf guard of a training step: detectron2's ``SimpleTrainer`` / ``AMPTrainer`` whose
step stops, with :class:`~san_det.engine.checkpoint.NonFiniteError`, before the optimizer changes
the model when a loss (or, without AMP, a gradient) is not finite.

The guard wraps detectron2's own ``run_step`` through public doors of torch: a forward hook on
the model checks the losses it returns (before detectron2 logs them, which would raise its own
``FloatingPointError`` on the main process alone), and an optimizer step pre-hook checks the
gradients (after ``backward``, so DDP's gradient all-reduce has completed on every process).
All processes agree on the outcome, so all stop at the same step.
"""

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm

from .checkpoint import NonFiniteError

__all__ = ["GuardedAMPTrainer", "GuardedSimpleTrainer"]


def _all_finite(flags: torch.Tensor) -> bool:
    """``flags`` (bool, any shape) all true on every process (a collective when world > 1)."""
    flags = flags.float()
    if comm.get_world_size() > 1:  # every process must stop at the same step
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return bool(flags.min())  # the host sync


class _FiniteStepGuard:
    """Mixin for detectron2's ``SimpleTrainer`` / ``AMPTrainer``: refuses the optimizer step of a
    step whose loss (or, with :attr:`check_gradients`, gradient) is not finite, raising
    :class:`NonFiniteError`. Under AMP the gradients are scaled and an overflow is routine (the
    grad scaler skips that step and lowers its scale), so only the losses are checked there.
    """

    check_gradients = True

    def run_step(self):
        """detectron2's step, with the losses checked after the forward pass and the gradients
        before the optimizer step (once per step, whatever the optimizer's class nesting)."""
        losses = {}
        gradients_checked = []

        def check_losses(module, inputs, output):
            losses.update(output if isinstance(output, dict) else {"total_loss": output})
            values = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
            if not _all_finite(values):
                raise self._error("loss", losses)

        def check_gradients(optimizer, args, kwargs):
            if gradients_checked:
                return
            gradients_checked.append(True)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            device = next(iter(losses.values())).device
            ok = torch.ones((), dtype=torch.bool, device=device)
            if grads:
                norms = torch.stack([n.float().to(device) for n in torch._foreach_norm(grads)])
                ok = torch.isfinite(norms.sum())
            if not _all_finite(ok):
                raise self._error("gradient", losses)

        handles = [self.model.register_forward_hook(check_losses)]
        if self.check_gradients:
            handles.append(self.optimizer.register_step_pre_hook(check_gradients))
        try:
            super().run_step()
        finally:
            for handle in handles:
                handle.remove()

    def _error(self, what: str, losses) -> NonFiniteError:
        where = " on at least one process" if comm.get_world_size() > 1 else ""
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        return NonFiniteError(
            f"non-finite {what} at iteration {self.iter}{where} "
            f"(losses here: {values}); training stopped before the optimizer step"
        )


class GuardedSimpleTrainer(_FiniteStepGuard, SimpleTrainer):
    """``SimpleTrainer`` that refuses a step with a non-finite loss or gradient."""


class GuardedAMPTrainer(_FiniteStepGuard, AMPTrainer):
    """``AMPTrainer`` that refuses a step with a non-finite loss."""

    check_gradients = False
