"""Exponential moving average of the model's weights, as a detectron2 hook (SASA: decay 0.9999).

After every optimizer step, ``ema = d * ema + (1 - d) * weights`` for every floating-point
parameter and buffer (integer buffers such as BatchNorm's ``num_batches_tracked`` are copied).
With ``ramp`` the decay is ``min(decay, (1 + n) / (10 + n))`` at update ``n``, so short runs are
not dominated by the initial weights. The EMA is part of the trainer's checkpoint (resume
continues it) and is saved at the end of training as ``model_final_ema.pth``, a plain model
checkpoint usable as ``MODEL.WEIGHTS`` for evaluation or detection.
"""

import copy
import logging
import os
from typing import Callable, Dict, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..utils.atomic import atomic_write

__all__ = ["ModelEMA", "EMAHook", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class ModelEMA:
    """A frozen copy of ``model`` in eval mode holding the moving average of its state."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, ramp: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"CLASSIFICATION.EMA.DECAY must be in [0, 1), got {decay}")
        self.decay, self.ramp = decay, ramp
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.ramp:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        source = unwrap_model(model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = source[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(d).add_(value.to(ema_value.dtype), alpha=1.0 - d)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> Dict:
        return {"model": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict) -> None:
        self.module.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


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
        return self.ema.state_dict()

    def load_state_dict(self, state_dict):
        self.ema.load_state_dict(state_dict)
