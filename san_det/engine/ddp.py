"""Data-parallel wrapping that works for CPU processes (gloo) as well as GPUs.

detectron2 0.6 wraps the model with ``DistributedDataParallel(model, device_ids=[local_rank])``,
which torch rejects for a CPU model, and torch's ``nn.SyncBatchNorm`` only runs on GPUs.
:func:`wrap_ddp` passes ``device_ids`` only for GPU models and, for CPU models, swaps every
``nn.SyncBatchNorm`` for :class:`CPUSyncBatchNorm` (detectron2's ``NaiveSyncBatchNorm``, whose
statistics are all-reduced with fvcore's ``differentiable_all_reduce``, a collective gloo runs),
so ``MODEL.*.NORM: SyncBN`` configs train on CPU processes. :func:`unwrap_model` is the inverse.
"""

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["wrap_ddp", "unwrap_model", "CPUSyncBatchNorm", "convert_sync_batchnorm_for_cpu"]


class CPUSyncBatchNorm(NaiveSyncBatchNorm):
    """detectron2's ``NaiveSyncBatchNorm`` over the union of every process's batch, as
    ``nn.SyncBatchNorm`` is: statistics weighted by each process's batch size
    (``stats_mode="N"``, so processes may hold different batch sizes) and batches counted in
    ``num_batches_tracked`` as ``nn.BatchNorm2d`` counts them. Input: ``(N, C, H, W)``; output:
    same shape. With one process (or in eval mode) it is ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        if momentum is None or not affine or not track_running_stats:
            raise ValueError(
                "CPUSyncBatchNorm (detectron2's NaiveSyncBatchNorm) needs a momentum, affine=True "
                f"and track_running_stats=True; got momentum={momentum}, affine={affine}, "
                f"track_running_stats={track_running_stats}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, stats_mode="N")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(
                f"CPUSyncBatchNorm expects input of shape (N, C, H, W), got {input.dim()}D"
            )
        if self.training and comm.get_world_size() > 1:  # BatchNorm2d counts its own batches
            self.num_batches_tracked.add_(1)
        return super().forward(input)


def convert_sync_batchnorm_for_cpu(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``module`` by a :class:`CPUSyncBatchNorm` that keeps
    the very same parameter and buffer tensors (an optimizer built before stays valid).

    Returns the converted module (a new object only when ``module`` itself is a SyncBatchNorm).
    """
    if isinstance(module, nn.SyncBatchNorm):
        if module.process_group is not None:
            raise ValueError("CPUSyncBatchNorm synchronises over all processes, not a subgroup")
        new = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        for name, param in module.named_parameters(recurse=False):
            setattr(new, name, param)
        for name, buf in module.named_buffers(recurse=False):
            setattr(new, name, buf)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm_for_cpu(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **kwargs)`` when there is more than one process, else
    ``model``; works for CPU models (gloo) as well as GPU models (NCCL).

    GPU models get ``device_ids=[local_rank]`` unless given. On CPU, ``nn.SyncBatchNorm`` layers are
    converted in place (:func:`convert_sync_batchnorm_for_cpu`) first. Call it after building the
    optimizer, as detectron2's trainers do: parameters are not copied.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    on_cpu = _model_device(model).type == "cpu"
    if on_cpu:
        model = convert_sync_batchnorm_for_cpu(model)
    if comm.get_world_size() == 1:
        return model
    if on_cpu:
        if kwargs.get("device_ids"):
            raise ValueError(f"wrap_ddp: device_ids={kwargs['device_ids']} given for a CPU model")
        kwargs["device_ids"] = None
    elif "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    with warnings.catch_warnings():
        # torch >= 2.12 deprecates broadcast_buffers (detectron2 passes False); same meaning.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(model, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _model_device(model: nn.Module) -> torch.device:
    tensor: Optional[torch.Tensor] = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
