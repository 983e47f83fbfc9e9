"""Exponential moving average of the model's weights, as a detectron2 hook (SASA: decay 0.9999).

After every optimizer step, ``ema = d * ema + (1 - d) * weights`` (torch's ``AveragedModel``) for every floating-point
parameter and buffer (integer buffers such as BatchNorm's ``num_batches_tracked`` are copied).
With ``ramp`` the decay is ``min(decay, (1 + n) / (10 + n))`` at update ``n``, so short runs are
not dominated by the initial weights. The EMA is part of the trainer's checkpoint (resume
continues it) and is saved at the end of training as ``model_final_ema.pth``, a plain model
checkpoint usable as ``MODEL.WEIGHTS`` for evaluation or detection.
"""

import logging
import os
from typing import Callable, Dict, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..engine.ddp import unwrap_model
from ..utils.atomic import atomic_write

__all__ = ["ModelEMA", "EMAHook"]

logger = logging.getLogger(__name__)


class ModelEMA(AveragedModel):
    """torch's ``AveragedModel`` of ``model``'s parameters and buffers (``use_buffers``) with
    ``get_ema_multi_avg_fn``'s update at the decay :meth:`current_decay`; integer buffers are
    copied. In eval mode, without gradients; :attr:`module` is the averaged model.

    The average starts at ``model``'s weights: the first :meth:`update` already averages
    (``AveragedModel`` alone would copy the model there), so ``n_averaged`` is
    :attr:`num_updates` + 1.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, ramp: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"CLASSIFICATION.EMA.DECAY must be in [0, 1), got {decay}")
        model = unwrap_model(model)
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.decay, self.ramp = decay, ramp
        self.update_parameters(model)  # n_averaged 0 -> 1: a copy of the initial weights
        self.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged) - 1

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, (1 + n) / (10 + n))`` at update ``n``
        with ``ramp``, else ``decay``."""
        if not self.ramp:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    def _average(self, ema_tensors, model_tensors, _num_averaged) -> None:
        if ema_tensors[0].is_floating_point():
            get_ema_multi_avg_fn(self.current_decay())(ema_tensors, model_tensors, _num_averaged)
        else:  # integer buffers (BatchNorm's num_batches_tracked): the model's
            torch._foreach_copy_(ema_tensors, model_tensors)

    def update(self, model: torch.nn.Module) -> None:
        """Average in ``model``'s current weights (DDP-wrapped or not)."""
        self.update_parameters(unwrap_model(model))

    def ema_state_dict(self) -> Dict:
        """``{"model": averaged state dict, "num_updates": n}`` (the trainer checkpoint's entry)."""
        return {"model": self.module.state_dict(), "num_updates": self.num_updates}

    def load_ema_state_dict(self, state: Dict) -> None:
        self.module.load_state_dict(state["model"])
        self.n_averaged.fill_(int(state["num_updates"]) + 1)


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every step; saves it when training ends.

    Args:
        ema: the average to update.
        output_dir: where ``model_final_ema.pth`` is written (main process only; "" = nowhere).
        extra: callable returning extra entries of the saved file (e.g. classifier metadata).
    """

    def __init__(self, ema: ModelEMA, output_dir: str = "", extra: Optional[Callable] = None):
        self.ema, self.output_dir, self.extra = ema, output_dir, extra

    def after_step(self):
        self.ema.update(self.trainer.model)

    def after_train(self):
        if not self.output_dir or not comm.is_main_process():
            return
        if self.trainer.iter + 1 < self.trainer.max_iter:  # training failed or stopped early
            return
        path = os.path.join(self.output_dir, "model_final_ema.pth")
        data = {"model": self.ema.module.state_dict(), "iteration": self.trainer.iter}
        if self.extra is not None:
            data.update(self.extra())
        with atomic_write(path) as f:
            torch.save(data, f)
        logger.info(f"Saved the EMA weights to {path}")

    def state_dict(self):
        return self.ema.ema_state_dict()

    def load_state_dict(self, state_dict):
        self.ema.load_ema_state_dict(state_dict)
